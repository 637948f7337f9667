"""Streaming Wan VAE decode equals the full decode for any block split; normalisation round-trips; bad input raises."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from oneforcing.pipelines.vae_streaming import (
    WanStreamingDecoder,
    denormalize_latents,
    encode_video,
    normalize_latents,
)

FRAMES, H, W = 6, 2, 4  # latent frames and size -> 21 video frames of 16 x 32


def _tiny_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    return AutoencoderKLWan(**{**config, **overrides}).eval()


def _full_decode(vae, latents):
    with torch.no_grad():
        return vae.decode(denormalize_latents(latents, vae)).sample


def _stream(decoder, latents, split):
    pieces, start = [], 0
    for size in split:
        pieces.append(decoder.decode_block(latents[:, :, start : start + size]))
        start += size
    assert start == latents.shape[2]
    return pieces


@pytest.fixture(scope="module")
def vae():
    return _tiny_vae()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, FRAMES, H, W, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def full(vae, latents):
    video = _full_decode(vae, latents)
    assert video.shape == (1, 3, 1 + 4 * (FRAMES - 1), 8 * H, 8 * W)
    return video


@pytest.mark.parametrize("split", [[1] * FRAMES, [3, 3], [1, 2, 3], [FRAMES]])
def test_streaming_equals_full_decode(vae, latents, full, split):
    decoder = WanStreamingDecoder(vae)
    pieces = _stream(decoder, latents, split)
    assert [p.shape[2] for p in pieces] == [1 + 4 * (split[0] - 1)] + [4 * s for s in split[1:]]
    assert all(p.shape[3:] == (8 * H, 8 * W) for p in pieces)
    assert (torch.cat(pieces, 2) - full).abs().max() < 1e-5
    assert decoder.frames_decoded == full.shape[2] and decoder.latent_frames_decoded == FRAMES
    assert torch.cat(pieces, 2).abs().max() <= 1.0


def test_single_latent_frame_and_batch(vae, latents):
    one = WanStreamingDecoder(vae).decode_block(latents[:, :, :1])
    assert one.shape == (1, 3, 1, 8 * H, 8 * W)
    assert (one - _full_decode(vae, latents[:, :, :1])).abs().max() < 1e-5

    batch = torch.randn(2, 16, 3, H, W, generator=torch.Generator().manual_seed(5))
    pieces = _stream(WanStreamingDecoder(vae), batch, [1, 2])
    full = _full_decode(vae, batch)
    assert (torch.cat(pieces, 2) - full).abs().max() < 1e-5


def test_reset_starts_a_fresh_stream(vae, latents, full):
    decoder = WanStreamingDecoder(vae)
    decoder.decode_block(latents[:, :, :2])
    decoder.decode_block(latents[:, :, 2:3])
    decoder.reset()
    assert decoder.first_block and decoder.frames_decoded == 0 and decoder.latent_frames_decoded == 0
    again = _stream(decoder, latents, [3, 3])
    assert again[0].shape[2] == 9  # the first block of a new video again yields 1 + 4 (f - 1) frames
    assert (torch.cat(again, 2) - full).abs().max() < 1e-5


def test_vae_state_is_not_shared_with_the_stream(vae, latents, full):
    other = torch.randn(1, 16, 2, H, W, generator=torch.Generator().manual_seed(7))
    other_before = _full_decode(vae, other)
    decoder = WanStreamingDecoder(vae)
    first = decoder.decode_block(latents[:, :, :2])
    # the VAE's own decode / encode mid-stream: unchanged results, and the stream carries on undisturbed
    assert torch.equal(_full_decode(vae, other), other_before)
    encode_video(vae, torch.zeros(1, 3, 1, 8 * H, 8 * W))
    rest = decoder.decode_block(latents[:, :, 2:])
    assert (torch.cat([first, rest], 2) - full).abs().max() < 1e-5
    # decode_all uses a cache of its own and leaves the stream alone
    assert (decoder.decode_all(latents) - full).abs().max() < 1e-5
    assert decoder.frames_decoded == full.shape[2]


def test_normalisation(vae):
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    z = torch.randn(2, 16, 3, 2, 5, generator=torch.Generator().manual_seed(3))
    latents = normalize_latents(z, vae)
    assert torch.allclose(latents, (z - mean) / std, atol=1e-6)
    assert torch.allclose(denormalize_latents(latents, vae), z, atol=1e-5)
    assert torch.allclose(denormalize_latents(z, vae), z * std + mean, atol=1e-6)
    half = normalize_latents(z.bfloat16(), vae)
    assert half.dtype == torch.bfloat16 and half.shape == z.shape
    assert torch.allclose(half.float(), latents, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="16 channels"):
        normalize_latents(torch.zeros(1, 8, 1, 2, 2), vae)
    with pytest.raises(ValueError, match="5-D"):
        denormalize_latents(torch.zeros(16, 1, 2, 2), vae)


def test_encode_video(vae):
    video = torch.rand(1, 3, 5, 32, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = encode_video(vae, video, fast=False)
    assert latents.shape == (1, 16, 2, 4, 3)
    with torch.no_grad():
        mode = vae.encode(video).latent_dist.mode()
    assert torch.allclose(latents, normalize_latents(mode, vae))
    torch.testing.assert_close(encode_video(vae, video), latents, atol=2e-5, rtol=1e-5)  # the fast path
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_video(vae, video[:, :, :4])
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_video(vae, video[..., :20])
    with pytest.raises(ValueError, match="3 channels"):
        encode_video(vae, video[:, :1])


def test_bad_latents(vae, latents):
    decoder = WanStreamingDecoder(vae)
    with pytest.raises(ValueError, match="16 \\(the VAE's z_dim\\)"):
        decoder.decode_block(torch.zeros(1, 8, 1, H, W))
    with pytest.raises(ValueError, match="5-D"):
        decoder.decode_block(torch.zeros(16, 1, H, W))
    with pytest.raises(ValueError, match="no frame"):
        decoder.decode_block(latents[:, :, :0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        decoder.decode_block(latents.numpy())
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        WanStreamingDecoder(torch.nn.Conv3d(16, 3, 1))
    assert decoder.first_block  # failed calls decoded nothing
    decoder.decode_block(latents[:, :, :1])
    with pytest.raises(ValueError, match="reset"):
        decoder.decode_block(torch.zeros(1, 16, 1, H + 1, W))
    with pytest.raises(ValueError, match="reset"):
        decoder.decode_block(torch.zeros(2, 16, 1, H, W))


def test_wan22_layout_streams_too():
    """The patchified Wan2.2 VAE (residual up-blocks that use first_chunk, unpatchify at the end) streams as well."""
    vae = _tiny_vae(
        seed=1, z_dim=48, is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
        latents_mean=[0.1] * 48, latents_std=[2.0] * 48,
    )
    latents = torch.randn(1, 48, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    full = _full_decode(vae, latents)
    pieces = _stream(WanStreamingDecoder(vae), latents, [1, 2])
    assert [p.shape[2] for p in pieces] == [1, 8] and full.shape == (1, 3, 9, 32, 32)
    assert (torch.cat(pieces, 2) - full).abs().max() < 1e-5


def test_snapshot_restore_rewinds_the_stream(vae, latents, full):
    """Decoding on from a snapshot gives the frames the stream gave after it, however far it went meanwhile."""
    decoder = WanStreamingDecoder(vae)
    first = decoder.decode_block(latents[:, :, :2])
    saved = decoder.snapshot()
    after = decoder.decode_block(latents[:, :, 2:4])
    decoder.decode_block(latents[:, :, 4:])  # the stream goes on, then rewinds
    decoder.restore(saved)
    assert decoder.frames_decoded == first.shape[2] and decoder.latent_frames_decoded == 2
    assert torch.equal(decoder.decode_block(latents[:, :, 2:4]), after)
    decoder.restore(saved)  # the snapshot is not consumed: a second branch from it
    assert torch.equal(decoder.decode_block(latents[:, :, 2:4]), after)
