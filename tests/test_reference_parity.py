"""The rollout reproduces the public One-Forcing reference implementation (fixture made with its code, float32)."""

from pathlib import Path

import pytest
import torch

from oneforcing import CausalWanTransformer3DModel, OneForcingScheduler, causal_rollout

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture_sampler(renoise: torch.Tensor):
    """Replays the reference's re-noising draws ([B*F, C, H, W] each, in order) as [B, C, F, H, W]."""
    draws = iter(renoise)

    def sample(shape, dtype, device):
        batch, _, frames = shape[:3]
        return next(draws).reshape(batch, frames, *shape[1:2], *shape[3:]).permute(0, 2, 1, 3, 4).to(dtype)

    return sample


@pytest.mark.parametrize("fuse_context_pass", [False, True])
def test_framewise_rollout_matches_reference_fixture(fuse_context_pass):
    io = torch.load(FIXTURES / "ref_tiny_io.pt", weights_only=True)
    model = CausalWanTransformer3DModel.from_single_file(
        FIXTURES / "ref_tiny_oneforcing.pt", num_attention_heads=io["config"]["num_heads"]
    )
    scheduler = OneForcingScheduler(denoising_timesteps=[1000], first_block_timesteps=[1000, 750, 500, 250])
    assert torch.allclose(scheduler.block_timesteps(0), io["first_timesteps"].float(), atol=1e-3)
    assert torch.allclose(scheduler.block_timesteps(1), io["timesteps"].float())

    noise = io["noise_BFCHW"].permute(0, 2, 1, 3, 4).contiguous()
    with torch.no_grad():
        blocks = list(
            causal_rollout(
                model, scheduler, noise, io["prompt_embeds"], frames_per_block=1,
                noise_sampler=_fixture_sampler(io["renoise"]), fuse_context_pass=fuse_context_pass,
            )
        )
    latents = torch.cat([b.latents for b in blocks], dim=2).permute(0, 2, 1, 3, 4)
    assert latents.shape == io["latents_BFCHW"].shape
    assert (latents - io["latents_BFCHW"]).abs().max().item() < 1e-4


def test_fixture_is_sensitive_to_the_context_pass():
    """Guards the parity test itself: skipping the cache commit must break it."""
    io = torch.load(FIXTURES / "ref_tiny_io.pt", weights_only=True)
    model = CausalWanTransformer3DModel.from_single_file(FIXTURES / "ref_tiny_oneforcing.pt", num_attention_heads=2)
    scheduler = OneForcingScheduler(denoising_timesteps=[1000], first_block_timesteps=[1000, 750, 500, 250])
    noise = io["noise_BFCHW"].permute(0, 2, 1, 3, 4).contiguous()
    with torch.no_grad():
        blocks = list(
            causal_rollout(
                model, scheduler, noise, io["prompt_embeds"], frames_per_block=1,
                noise_sampler=_fixture_sampler(io["renoise"]), context_timestep=500.0,
            )
        )
    latents = torch.cat([b.latents for b in blocks], dim=2).permute(0, 2, 1, 3, 4)
    assert (latents[:, 1:] - io["latents_BFCHW"][:, 1:]).abs().max().item() > 1e-4  # the parity tolerance
