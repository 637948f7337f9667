"""One-Forcing: one-step autoregressive video generation.

Imported as ``oneforcing`` it is a diffusers-style library. The same folder is also a ComfyUI custom-node package:
cloned into ``ComfyUI/custom_nodes/`` it registers the nodes of ``nodes/`` (model loader, UMT5 text encoder, prompt
schedule, autoregressive rollout, start-frame encoder, streaming Wan VAE decoder) through ComfyUI's V3 entry point
:func:`comfy_entrypoint`. ComfyUI is never needed to use the library: the node layer imports ``comfy_api`` only when
ComfyUI calls the entry point.

The folder is a package, never an import root: ``kernels/``, ``nodes/``, ``pipelines/`` and ``training/`` are
namespace packages and the only modules beside this file are dunder files, so with the folder itself on ``sys.path``
(``python -m`` or a notebook started here) every installed distribution of the same name is still the one imported.
"""

from pathlib import Path

# Every component module is imported here on purpose: diffusers resolves a saved pipeline's non-diffusers component
# classes only from modules that are already imported.
from .pipelines.block_steps import PromptHandle
from .pipelines.kv_cache import KVCache
from .pipelines.layout import BlockLayout
from .pipelines.pipeline_one_forcing import OneForcingPipeline, OneForcingPipelineOutput
from .pipelines.prompt_schedule import PromptRange, PromptSchedule
from .pipelines.rollout import causal_rollout
from .pipelines.scheduling_one_forcing import OneForcingScheduler
from .pipelines.session import CachePolicy, GenerationSession, NoiseSource
from .pipelines.tiny_vae import TinyWanStreamingDecoder, TinyWanVAE
from .pipelines.transformer_causal_wan import CausalWanOutput, CausalWanTransformer3DModel

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "models" / "oneforcing-demo"
"""The bundled demo pipeline (a ``OneForcingPipeline.from_pretrained`` folder); the CLI's and the nodes' default."""

__all__ = [
    "DEMO_MODEL_DIR",
    "BlockLayout",
    "CachePolicy",
    "CausalWanTransformer3DModel",
    "CausalWanOutput",
    "GenerationSession",
    "KVCache",
    "NoiseSource",
    "OneForcingPipeline",
    "OneForcingPipelineOutput",
    "OneForcingScheduler",
    "PromptHandle",
    "PromptRange",
    "PromptSchedule",
    "TinyWanStreamingDecoder",
    "TinyWanVAE",
    "causal_rollout",
    "comfy_entrypoint",
]


# No NODE_CLASS_MAPPINGS here on purpose: ComfyUI loads a module that has it as a V1 pack and then ignores
# comfy_entrypoint.
async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing this package's nodes."""
    from .nodes.definitions import comfy_entrypoint as entrypoint

    return await entrypoint()
