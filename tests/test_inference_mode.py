"""The library under torch.inference_mode() (how ComfyUI runs every node)."""

import torch
from conftest import make_tiny_transformer

from oneforcing import OneForcingScheduler, causal_rollout


def test_rollout_runs_under_inference_mode():
    """ComfyUI runs nodes under torch.inference_mode(): tensors made there have no version counter."""
    transformer = make_tiny_transformer()
    scheduler = OneForcingScheduler()
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 8, transformer.config.text_dim)
    with torch.inference_mode():
        inference_embeds = embeds.clone()  # an inference tensor, as ComfyUI's CONDITIONING is
        assert inference_embeds.is_inference()
        blocks = list(causal_rollout(transformer, scheduler, noise, inference_embeds, frames_per_block=1,
                                     generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        plain = list(causal_rollout(transformer, scheduler, noise, embeds, frames_per_block=1,
                                    generator=torch.Generator().manual_seed(1)))
    assert len(blocks) == 3
    for a, b in zip(blocks, plain):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
