"""Decoding on a side stream: the same videos in the same order, one block late except the first (CPU: the order
logic; GPU: the streams, and the pipeline's output with and without it)."""

import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_vae

from oneforcing.pipelines.decode_overlap import SideStreamDecoder
from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _blocks(device="cpu"):
    latents = torch.randn(1, 16, 7, 4, 6, generator=torch.Generator().manual_seed(0)).to(device)
    return [latents[:, :, :1], latents[:, :, 1:4], latents[:, :, 4:]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_same_videos_in_order_one_block_late_but_the_first(device):
    vae = make_tiny_vae().to(device)
    blocks = _blocks(device)
    reference = WanStreamingDecoder(vae)
    want = [reference.decode_block(b) for b in blocks]
    pulled = []

    def source():
        for index, block in enumerate(blocks):
            pulled.append(index)
            yield index, block

    got = []
    with torch.no_grad():
        for tag, video in SideStreamDecoder(WanStreamingDecoder(vae), device).decode(source()):
            got.append((tag, video, list(pulled)))
    assert [tag for tag, _, _ in got] == [0, 1, 2]
    assert got[0][2] == [0]  # the first block comes back before the next is asked for
    assert got[1][2] == [0, 1, 2]  # later ones once the block after them has been asked for (made)
    for (_, video, _), expected in zip(got, want):
        torch.testing.assert_close(video, expected, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_pipeline_video_is_the_same_with_the_overlapped_decode():
    pipe = make_tiny_pipeline(seed=2).to("cuda")
    kwargs = dict(prompt="a corgi surfing", num_frames=13, height=32, width=48, output_type="pt")
    whole = pipe(**kwargs, generator=torch.Generator("cuda").manual_seed(0)).frames  # overlapped
    streamed = torch.cat(list(pipe.stream(**kwargs, generator=torch.Generator("cuda").manual_seed(0))), dim=1)
    torch.testing.assert_close(whole, streamed, atol=1e-5, rtol=1e-5)
