"""The library and the nodes under torch.inference_mode() (how ComfyUI runs every node)."""

import torch
from conftest import make_tiny_transformer
from test_nodes import model_tree, roots  # noqa: F401 (fixtures)

from oneforcing import OneForcingScheduler, causal_rollout
from oneforcing.nodes.definitions import OneForcingEncode as Encode
from oneforcing.nodes.definitions import OneForcingModelLoader as Loader
from oneforcing.nodes.definitions import OneForcingPromptSchedule as Schedule
from oneforcing.nodes.definitions import OneForcingRollout as Rollout
from oneforcing.nodes.folders import BUNDLED_DEMO


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


def test_the_nodes_run_under_inference_mode_as_comfyui_runs_them(roots):
    """Every node of an image-to-video graph with a prompt switch and a rolling cache, run as ComfyUI runs nodes
    (each under ``torch.inference_mode()``, the CONDITIONING and LATENTs then inference tensors), makes the video it
    makes as plain code: prompts are told apart by their handles, not by tensor versions."""
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(3))

    def graph():
        model, = Loader.execute(BUNDLED_DEMO, "default", "auto")
        cond, = Schedule.execute(BUNDLED_DEMO, "0: a red circle moves left\n13: a cat on the beach", "default")
        context, = Encode.execute(image, BUNDLED_DEMO, 16, 16)
        latent, = Rollout.execute(model, cond, 5, 16, 16, 33, 1, "first block four steps", None, context, 4, 1)
        return cond, latent

    with torch.inference_mode():
        cond, latent = graph()
        assert cond[0][0].is_inference() and latent["samples"].is_inference()
    with torch.no_grad():
        _, plain = graph()
    assert not plain["samples"].is_inference()
    torch.testing.assert_close(latent["samples"], plain["samples"], rtol=0, atol=0)
