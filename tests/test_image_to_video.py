"""Image-to-video and video extension: the context is VAE-encoded, committed as clean frames, and the output starts
with it."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_pipeline

from oneforcing import OneForcingScheduler, causal_rollout
from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

ARGS = dict(height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    pipe = make_tiny_pipeline(seed=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed=0):
    return np.random.default_rng(seed).random((32, 32, 3), dtype=np.float32)


def _run(pipe, **kw):
    return pipe("a cat on the beach", generator=torch.Generator().manual_seed(0), **ARGS, **kw).frames


def _decode(pipe, latents):
    video = WanStreamingDecoder(pipe.vae).decode_all(latents)
    return pipe.video_processor.postprocess_video(video.float(), output_type="np")


def test_image_to_video_starts_with_the_image(pipe):
    image = _image()
    context = pipe.encode_context(image=image, height=32, width=32)
    assert context.shape == (1, 16, 1, 4, 4) and context.dtype == torch.float32
    latents = _run(pipe, image=image, num_frames=9, output_type="latent")
    assert latents.shape == (1, 16, 3, 4, 4)
    assert torch.equal(latents[:, :, :1], context)
    frames = _run(pipe, image=image, num_frames=9)
    assert frames.shape == (1, 9, 32, 32, 3)
    assert np.abs(frames[:, :1] - _decode(pipe, context)).max() < 1e-5  # the decode of the image
    # the whole output is the decode of its latents, and the image changes what follows
    assert np.abs(frames - _decode(pipe, latents)).max() < 1e-5
    other = _run(pipe, image=_image(1), num_frames=9, output_type="latent")
    assert (other[:, :, 1:] - latents[:, :, 1:]).abs().max() > 1e-3


def test_image_formats_agree(pipe):
    image = _image()
    as_uint8 = (image * 255).round().astype(np.uint8)
    from_np = pipe.encode_context(image=as_uint8, height=32, width=32)
    from_pil = pipe.encode_context(image=PIL.Image.fromarray(as_uint8), height=32, width=32)
    from_torch = pipe.encode_context(image=torch.from_numpy(as_uint8).permute(2, 0, 1), height=32, width=32)
    assert torch.allclose(from_np, from_pil, atol=1e-5) and torch.allclose(from_np, from_torch, atol=1e-5)
    resized = pipe.encode_context(image=PIL.Image.fromarray(as_uint8).resize((64, 48)), height=32, width=32)
    assert resized.shape == from_np.shape


def test_context_latents_are_the_first_frames(pipe):
    context = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    latents = _run(pipe, context_latents=context, num_frames=13, output_type="latent")
    assert latents.shape == (1, 16, 4, 4, 4)
    assert torch.equal(latents[:, :, :2], context)
    # the same as the rollout continuing a cache that holds the context
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    direct = _run(pipe, context_latents=context, num_frames=13, output_type="latent", latents=noise)
    with torch.no_grad():
        text = pipe.encode_prompt("a cat on the beach", max_sequence_length=16)
        blocks = list(causal_rollout(pipe.transformer, OneForcingScheduler(), noise, text, context_latents=context,
                                     generator=torch.Generator().manual_seed(0)))
    assert torch.equal(direct[:, :, 2:], torch.cat([b.latents for b in blocks], dim=2))
    assert [b.start_frame for b in blocks] == [2, 3]


def test_video_extension_continues_the_clip(pipe):
    clip = np.random.default_rng(4).random((5, 32, 32, 3), dtype=np.float32)  # 5 = 1 + 4 frames
    encoded = pipe.encode_context(video=clip, height=32, width=32)
    assert encoded.shape == (1, 16, 2, 4, 4)
    chunks = list(pipe.stream("a cat on the beach", generator=torch.Generator().manual_seed(0), video=clip,
                              num_frames=13, **ARGS))
    assert [c.shape[1] for c in chunks] == [5, 4, 4]  # the clip's decode first, then each generated block
    assert np.abs(chunks[0] - _decode(pipe, encoded)).max() < 1e-5
    latents = _run(pipe, context_latents=encoded, num_frames=13, output_type="latent")  # the same run, as latents
    assert torch.equal(latents[:, :, :2], encoded)
    # one continuous video: the streamed pieces equal the decode of all its latents in one piece
    assert np.abs(np.concatenate(chunks, axis=1) - _decode(pipe, latents)).max() < 1e-5


def test_bad_context_inputs(pipe):
    with pytest.raises(ValueError, match="video has 6 frames.*1 \\+ 4k frames: use 5 or 9"):
        _run(pipe, video=np.zeros((6, 32, 32, 3), np.float32), num_frames=13)
    with pytest.raises(ValueError, match="at most one of image, video or context_latents"):
        _run(pipe, image=_image(), video=np.zeros((5, 32, 32, 3), np.float32), num_frames=13)
    with pytest.raises(ValueError, match="nothing to generate after the context's 5 frames"):
        _run(pipe, video=np.zeros((5, 32, 32, 3), np.float32), num_frames=5)
    with pytest.raises(ValueError, match="context_latents must be normalised latents"):
        _run(pipe, context_latents=torch.zeros(1, 16, 1, 8, 8), num_frames=9)
    with pytest.raises(ValueError, match="image as a numpy array"):
        _run(pipe, image=np.zeros((32, 32), np.float32), num_frames=9)
    with pytest.raises(TypeError, match="image must be a PIL image"):
        _run(pipe, image="cat.png", num_frames=9)
