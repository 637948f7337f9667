"""One-Forcing: one-step autoregressive video generation.

Imported as ``oneforcing`` it is a diffusers-style library. The same folder is also a ComfyUI custom-node package:
cloned into ``ComfyUI/custom_nodes/`` it registers the nodes of ``nodes/`` (model loader, UMT5 text encoder, prompt
schedule, autoregressive rollout, start-frame encoder, streaming Wan VAE decoder) through ComfyUI's V3 entry point
:func:`comfy_entrypoint`. ComfyUI
is never needed to use the library: the node layer imports ``comfy_api`` only when ComfyUI calls the entry point.
"""

from pathlib import Path

from .pipelines import (
    CausalWanTransformer3DModel,
    KVCache,
    OneForcingPipeline,
    OneForcingPipelineOutput,
    OneForcingScheduler,
    causal_rollout,
)

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "models" / "oneforcing-demo"
"""The bundled demo pipeline (a ``OneForcingPipeline.from_pretrained`` folder); the CLI's and the nodes' default."""

__all__ = [
    "DEMO_MODEL_DIR",
    "CausalWanTransformer3DModel",
    "KVCache",
    "OneForcingPipeline",
    "OneForcingPipelineOutput",
    "OneForcingScheduler",
    "causal_rollout",
    "comfy_entrypoint",
]


# No NODE_CLASS_MAPPINGS here on purpose: ComfyUI loads a module that has it as a V1 pack and then ignores
# comfy_entrypoint.
async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing this package's nodes."""
    from .nodes.comfy_nodes import comfy_entrypoint as entrypoint

    return await entrypoint()
