"""One-Forcing: one-step autoregressive video generation.

Imported as ``oneforcing`` it is a diffusers-style library. The same folder is meant to be dropped into
``ComfyUI/custom_nodes/`` as a node package; the nodes (``nodes/``) are not written yet, so ComfyUI finds none today.
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
