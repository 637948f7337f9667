"""Weight-only fp8 storage: a linear layer's weight kept as ``float8_e4m3fn`` with a per-layer float32 scale, upcast
to the compute dtype for that layer's forward only.

The representation is ComfyUI's "scaled fp8": ``<layer>.weight`` [out, in] float8_e4m3fn and ``<layer>.scale_weight``
[] float32 with ``W = weight * scale_weight``, so such files load without a wider copy and a stored model's state dict
is one. The upcast runs in a hook of diffusers' hook registry on each stored layer (the same machinery as diffusers'
``enable_layerwise_casting``, which casts without scales); activations, biases, norms and embeddings stay in the
compute dtype. PEFT reads the layer's ``compute_dtype`` attribute, so LoRA adapters on a stored layer are made in the
compute dtype and run unfused; fusing into fp8 weights is refused (see ``lora.py``).

Which layers each model stores: ``TRANSFORMER_FP8_LAYERS`` (every attention projection and feed-forward layer of the
blocks: nearly all of the weights) and ``UMT5_FP8_LAYERS`` (the same in the UMT5 encoder, except the feed-forward
output ``wo``: transformers casts its input to that weight's dtype, which fp8 would destroy).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

FP8_STORAGE_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_STORAGE_DTYPE).max
SCALE_SUFFIX = ".scale_weight"
_HOOK_NAME = "oneforcing_fp8_storage"

TRANSFORMER_FP8_LAYERS = re.compile(r"blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ffn\.net\.(?:0\.proj|2))")
UMT5_FP8_LAYERS = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.[qkvo]|DenseReluDense\.wi(?:_[01])?)")


class Fp8LinearHook(ModelHook):
    """Replaces a stored ``nn.Linear``'s forward: x [..., in] -> [..., out] in ``compute_dtype`` with the weight
    upcast for this call only."""

    _is_stateful = False

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype

    def new_forward(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        weight = module.weight.to(dtype) * module.scale_weight.to(dtype)
        bias = None if module.bias is None else module.bias.to(dtype)
        return F.linear(x.to(dtype), weight, bias)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] weight -> (float8_e4m3fn weight, float32 scale []) with the largest magnitude mapped to fp8's max."""
    scale = (weight.detach().abs().amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight.detach().float() / scale).to(FP8_STORAGE_DTYPE), scale


def dequantized_weight(module: torch.nn.Linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a stored layer computes with, in ``dtype`` (a plain layer's weight cast to ``dtype``)."""
    if not is_fp8_stored(module):
        return module.weight.detach().to(dtype)
    return (module.weight.float() * module.scale_weight.float()).to(dtype)


def is_fp8_stored(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a linear layer with fp8 weight storage."""
    return isinstance(module, torch.nn.Linear) and module.weight.dtype == FP8_STORAGE_DTYPE


def store_linear_in_fp8(linear: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
    """Keep ``linear``'s weight in fp8 (quantized now unless it already is: then its scale is kept, or 1 when it has
    none) and compute in ``compute_dtype``; the bias is cast to ``compute_dtype``. Works on meta layers too (structure
    before loading)."""
    if linear.weight.dtype == FP8_STORAGE_DTYPE:
        scale = getattr(linear, "scale_weight", None)
        weight, scale = linear.weight.detach(), torch.ones((), device=linear.weight.device) if scale is None else scale
    else:
        weight, scale = quantize_weight(linear.weight)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.to(compute_dtype)
    linear.register_buffer("scale_weight", scale.reshape(()).to(linear.weight.device))
    linear.compute_dtype = compute_dtype  # PEFT makes a LoRA adapter of this layer in this dtype (as for bnb layers)
    registry = HookRegistry.check_if_exists_or_initialize(linear)
    if registry.get_hook(_HOOK_NAME) is None:
        registry.register_hook(Fp8LinearHook(compute_dtype), _HOOK_NAME)


def fp8_layer_names(model: torch.nn.Module, pattern: re.Pattern) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` that ``pattern`` matches whole."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)]


def enable_fp8_storage(model: torch.nn.Module, pattern: re.Pattern, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Store the linear layers of ``model`` named by ``pattern`` in fp8 (layer by layer: the peak is one layer's
    float32 copy), computing in ``compute_dtype``. Returns ``model``."""
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"compute dtype must be bfloat16, float16 or float32, got {compute_dtype}")
    names = fp8_layer_names(model, pattern)
    if not names:
        raise ValueError(f"{type(model).__name__} has no layers fp8 storage applies to")
    for name in names:
        store_linear_in_fp8(model.get_submodule(name), compute_dtype)
    return model


def stored_weight_keys(keys: Iterable[str], pattern: re.Pattern) -> frozenset[str]:
    """The ``<layer>.weight`` keys among ``keys`` (state-dict keys) of the layers ``pattern`` names."""
    return frozenset(k for k in keys if k.endswith(".weight") and pattern.fullmatch(k.removesuffix(".weight")))


def fp8_state_dict(state_dict: Mapping[str, torch.Tensor], stored: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each weight named in ``stored`` as fp8 + ``scale_weight`` (quantized unless it already is
    fp8; an fp8 weight without a scale gets scale 1). Other fp8 tensors must have been widened already."""
    out = dict(state_dict)
    for key in stored:
        scale_key = key[: -len(".weight")] + SCALE_SUFFIX
        if out[key].dtype != FP8_STORAGE_DTYPE:
            out[key], out[scale_key] = quantize_weight(out[key])
        else:
            out.setdefault(scale_key, torch.ones(()))
        out[scale_key] = out[scale_key].float().reshape(())
    return out
