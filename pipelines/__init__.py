"""The library: causal Wan transformer, KV cache, scheduler, rollout, pipeline and checkpoint loading.

Every component module is imported here on purpose: diffusers resolves a saved pipeline's non-diffusers component
classes only from modules that are already imported.
"""

from .kv_cache import KVCache
from .prompt_schedule import PromptRange, PromptSchedule
from .rollout import RolloutBlock, block_sizes, causal_rollout, commit_context, recache
from .scheduling_one_forcing import OneForcingScheduler
from .tiny_vae import TinyWanStreamingDecoder, TinyWanVAE
from .transformer_causal_wan import CausalWanOutput, CausalWanTransformer3DModel
from .pipeline_one_forcing import OneForcingPipeline, OneForcingPipelineOutput

__all__ = [
    "CausalWanOutput",
    "CausalWanTransformer3DModel",
    "KVCache",
    "OneForcingPipeline",
    "OneForcingPipelineOutput",
    "OneForcingScheduler",
    "PromptRange",
    "PromptSchedule",
    "RolloutBlock",
    "TinyWanStreamingDecoder",
    "TinyWanVAE",
    "block_sizes",
    "causal_rollout",
    "commit_context",
    "recache",
]
