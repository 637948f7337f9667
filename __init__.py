"""One-Forcing: one-step autoregressive video generation.

Imported as ``oneforcing`` it is a diffusers-style library; dropped into ``ComfyUI/custom_nodes/`` the same folder is a
ComfyUI node package (see ``comfy_entrypoint`` at the end of this file).
"""

from .pipelines import (
    CausalWanTransformer3DModel,
    KVCache,
    OneForcingPipeline,
    OneForcingPipelineOutput,
    OneForcingScheduler,
    causal_rollout,
)

__all__ = [
    "CausalWanTransformer3DModel",
    "KVCache",
    "OneForcingPipeline",
    "OneForcingPipelineOutput",
    "OneForcingScheduler",
    "causal_rollout",
]
