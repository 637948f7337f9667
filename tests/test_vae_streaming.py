"""Streaming Wan VAE decode equals the full decode, for any block split; normalisation round-trips."""

import pytest
import torch
from conftest import make_tiny_vae

from oneforcing.pipelines.vae_streaming import (
    WanStreamingDecoder,
    denormalize_latents,
    encode_video,
    normalize_latents,
)


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae(seed=2)


@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1], [3, 2], [1, 2, 2], [5]])
def test_streaming_equals_full_decode(vae, split):
    latents = torch.randn(1, 16, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(denormalize_latents(latents, vae)).sample
    decoder = WanStreamingDecoder(vae)
    pieces, start = [], 0
    for size in split:
        pieces.append(decoder.decode_block(latents[:, :, start:start + size]))
        start += size
    assert [p.shape[2] for p in pieces] == [1 + 4 * (split[0] - 1)] + [4 * s for s in split[1:]]
    assert (torch.cat(pieces, 2) - full).abs().max() < 1e-5
    assert decoder.frames_decoded == 17 and full.shape == (1, 3, 17, 32, 48)


def test_reset_and_vae_state_untouched(vae):
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = vae.decode(denormalize_latents(latents, vae)).sample
    decoder = WanStreamingDecoder(vae)
    first = decoder.decode_block(latents)
    decoder.reset()
    assert torch.equal(decoder.decode_block(latents), first)
    decoder.decode_block(latents[:, :, :1])  # leave a stream half-way
    with torch.no_grad():
        assert torch.equal(vae.decode(denormalize_latents(latents, vae)).sample, before)


def test_normalisation_round_trip_and_encode(vae):
    z = torch.randn(1, 16, 2, 3, 3)
    assert torch.allclose(denormalize_latents(normalize_latents(z, vae), vae), z, atol=1e-5)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latents = encode_video(vae, video)
    assert latents.shape == (1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_video(vae, video[:, :, :4])


def test_bad_latents(vae):
    with pytest.raises(ValueError, match="latents must be"):
        WanStreamingDecoder(vae).decode_block(torch.zeros(1, 8, 1, 4, 4))
    with pytest.raises(ValueError, match="latents must be"):
        WanStreamingDecoder(vae).decode_block(torch.zeros(16, 1, 4, 4))
