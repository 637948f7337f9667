"""LoRA adapters for the causal Wan transformer: diffusers' Wan LoRA loader with PEFT underneath.

:class:`OneForcingLoraLoaderMixin` is diffusers' ``WanLoraLoaderMixin`` (its key converters read the diffusers/PEFT,
original Wan ``diffusion_model.``, kohya/musubi ``lora_unet_`` and ComfyUI layouts) for a pipeline with one transformer,
plus a check before anything is injected: every key must name a linear layer this transformer has, with matching
shapes and one rank per layer, else the file is refused naming the first key that does not fit.

The causal forward calls each linear layer as a module, so PEFT's wrapped layers (unfused adapters, any strength) run
in it; the fused kernels of ``kernels/ops.py`` only do elementwise and norm work. :func:`adapter_state` is what a
recorded forward (``cuda_graphs``) bakes in of the adapters, so graphs are dropped when it changes.

A stack of LoRA files at strengths (:class:`LoraChoice`, what the ComfyUI LoRA node builds) is read and checked by
:func:`choose_lora_file` and put on a pipeline by :func:`apply_lora_stack`, which brings its adapters to exactly that
stack: one adapter per file content, loaded once and kept while the stack holds it.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers.loaders import WanLoraLoaderMixin
from safetensors import SafetensorError

from .atomic import file_digest
from .fp8 import is_fp8_stored

TRANSFORMER_PREFIX = "transformer."
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
"""The layers Wan LoRAs adapt (suffixes of diffusers module names): every attention projection and both
feed-forward layers of each block."""
_PEFT_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight")
_LORA_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


class OneForcingLoraLoaderMixin(WanLoraLoaderMixin):
    """``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unfuse_lora`` / ``unload_lora_weights`` /
    ``save_lora_weights`` as diffusers' Wan pipelines have them, for the pipeline's single ``transformer``."""

    _lora_loadable_modules = ["transformer"]

    @classmethod
    def load_lora_into_transformer(cls, state_dict, transformer, adapter_name=None, _pipeline=None,
                                   low_cpu_mem_usage=False, hotswap: bool = False, metadata=None):
        """diffusers' loader, after :func:`check_lora_matches` (``state_dict``: diffusers layout, converted)."""
        check_lora_matches(transformer, state_dict)
        super().load_lora_into_transformer(state_dict, transformer, adapter_name=adapter_name, _pipeline=_pipeline,
                                           low_cpu_mem_usage=low_cpu_mem_usage, hotswap=hotswap, metadata=metadata)

    def fuse_lora(self, components: list[str] | None = None, *args, **kwargs):
        """diffusers' ``fuse_lora``; refused while the transformer stores its weights in fp8 (adding the LoRA to
        fp8 weights would lose it in rounding: keep it unfused, ``set_adapters`` sets its strength)."""
        components = ["transformer"] if components is None else components
        if "transformer" in components and any(is_fp8_stored(m) for m in self.transformer.modules()):
            raise ValueError("fuse_lora needs full-precision transformer weights; with fp8 weight storage keep the "
                             "LoRA unfused (it runs in the compute dtype; set_adapters sets its strength)")
        super().fuse_lora(components, *args, **kwargs)


def _linear_layer(model: torch.nn.Module, name: str) -> torch.nn.Linear | None:
    """The linear layer called ``name`` (the base layer if PEFT already wraps it), or None."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, torch.nn.Linear) else None


def _lora_rank(key: str, tensor: torch.Tensor, layer: torch.nn.Linear, part: str) -> int | None:
    """The rank ``tensor`` (lora_A [r, in], lora_B [out, r] or a bias [out]) gives its layer; raises if it does not
    fit ``layer``. None for a bias."""
    if part == ".lora_B.bias":
        expected, rank = (layer.out_features,), None
    elif part == ".lora_A.weight":
        rank = tensor.shape[0] if tensor.ndim == 2 else -1
        expected = (rank, layer.in_features)
    else:
        rank = tensor.shape[1] if tensor.ndim == 2 else -1
        expected = (layer.out_features, rank)
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"LoRA key {key!r} has shape {tuple(tensor.shape)}, but the layer it adapts is {layer.in_features} -> "
            f"{layer.out_features} (expected {expected}): this LoRA was made for another model"
        )
    return rank


def check_lora_matches(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                       prefix: str = TRANSFORMER_PREFIX) -> None:
    """Refuse (ValueError naming the first key that does not fit) a LoRA state dict in diffusers layout whose keys
    name layers ``model`` lacks, whose shapes do not fit them, or whose lora_A and lora_B disagree on a layer's rank."""
    if not state_dict:
        raise ValueError("the LoRA holds no weights")
    ranks: dict[str, tuple[str, int]] = {}
    for key, tensor in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        part = next((p for p in _LORA_PARTS if key.endswith(p)), None)
        if name is None or part is None:
            raise ValueError(f"LoRA key {key!r} is not a {prefix}<layer>.lora_A/lora_B key of a Wan transformer LoRA "
                             "(or of any layout diffusers converts to one)")
        layer_name = name[: -len(part)]
        layer = _linear_layer(model, layer_name)
        if layer is None:
            raise ValueError(f"LoRA key {key!r} adapts {layer_name!r}, which is not a linear layer of this "
                             f"{type(model).__name__}: this LoRA was made for another model")
        rank = _lora_rank(key, tensor, layer, part)
        if rank is None:
            continue
        seen = ranks.setdefault(layer_name, (key, rank))
        if seen[1] != rank:
            raise ValueError(f"LoRA key {key!r} has rank {rank}, but {seen[0]!r} of the same layer has rank "
                             f"{seen[1]}")


def adapter_state(model: torch.nn.Module) -> tuple:
    """What a recorded forward bakes in of ``model``'s PEFT adapters: per adapted layer its active, merged and
    disabled adapters and their scales (Python numbers a CUDA graph captures as constants). () without PEFT."""
    if "peft" not in sys.modules:  # nothing can be adapted before PEFT is imported
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return tuple(
        (name, tuple(m.active_adapters), tuple(m.merged_adapters), m.disable_adapters,
         tuple(sorted(getattr(m, "scaling", {}).items())))
        for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)
    )


def wan_lora_file_tensors(state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                          scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A trained adapter as a Wan LoRA file in the original Wan layout: ``diffusion_model.<original layer>.lora_A
    .weight`` [r, in] and ``.lora_B.weight`` [out, r] in float32, with PEFT's ``scale`` (alpha / rank) folded into
    lora_B, so every loader reads it at strength 1 without an alpha.

    ``state_dict``: a PEFT-injected model's state dict (``<layer>.lora_A.<adapter>.weight``, ...).
    """
    from .loading import to_original_names

    out = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None or match["adapter"] != adapter_name:
            continue
        (original,) = to_original_names({f"{match['layer']}.weight": tensor})
        value = tensor.detach().float() * (scale if match["part"] == "B" else 1.0)
        out[f"diffusion_model.{original.removesuffix('.weight')}.lora_{match['part']}.weight"] = value.contiguous()
    if not out:
        raise ValueError(f"no LoRA weights of adapter {adapter_name!r} in this state dict")
    return out


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA file at a strength. ``digest`` (SHA-256 of the file's bytes) names its adapter, so a file is loaded once
    whatever its path, and a file rewritten in place becomes a new adapter."""

    path: Path
    digest: str
    strength: float = 1.0

    @property
    def adapter_name(self) -> str:
        return f"lora_{self.digest[:16]}"


def _read_lora_state_dict(pipe, path: Path) -> dict[str, torch.Tensor]:
    """The LoRA at ``path`` in diffusers layout, read only as safetensors (no pickle); ValueError naming the file."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"LoRA file {path}: only .safetensors LoRA files are read (a pickled file could run code)")
    try:
        return pipe.lora_state_dict(str(path), use_safetensors=True)
    except (OSError, SafetensorError, ValueError, KeyError) as err:
        raise ValueError(f"LoRA file {path} cannot be read as a LoRA: {err}") from err


def choose_lora_file(pipe, path: str | Path, strength: float = 1.0) -> LoraChoice:
    """``path`` at ``strength`` for ``pipe``'s transformer, read and checked now (missing, not safetensors, corrupt,
    or made for another model: a ValueError / FileNotFoundError naming the file; the pipeline is left as it is)."""
    path = Path(path)
    if not math.isfinite(strength):
        raise ValueError(f"LoRA file {path}: strength must be a finite number, got {strength}")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    digest = file_digest(path)
    state_dict = _read_lora_state_dict(pipe, path)
    try:
        check_lora_matches(pipe.transformer, state_dict)
    except ValueError as err:
        raise ValueError(f"LoRA file {path}: {err}") from err
    return LoraChoice(path, digest, float(strength))


def _load_adapter(pipe, choice: LoraChoice) -> None:
    if file_digest(choice.path) != choice.digest:
        raise ValueError(f"LoRA file {choice.path} changed on disk since it was chosen: choose it again (in ComfyUI: "
                         "queue the graph again, the LoRA node re-reads it)")
    try:
        pipe.load_lora_weights(str(choice.path), adapter_name=choice.adapter_name, use_safetensors=True)
    except (OSError, SafetensorError, ValueError, KeyError) as err:
        raise ValueError(f"LoRA file {choice.path}: {err}") from err


def loaded_adapters(pipe) -> list[str]:
    """The adapters loaded into ``pipe``'s transformer (active or not)."""
    return list(getattr(pipe.transformer, "peft_config", None) or {})


def apply_lora_stack(pipe, stack: Sequence[LoraChoice]) -> None:
    """Bring ``pipe``'s adapters to exactly ``stack``: each file's adapter active at its strength (a file listed twice
    at the sum of its strengths), nothing else loaded. Files not loaded yet are loaded, adapters the stack does not
    hold (or holds at strength 0) are deleted; an empty stack unloads every adapter, which gives the base model's
    output bit for bit. Expects unfused adapters (what the ComfyUI nodes make)."""
    strengths: dict[str, float] = {}
    files: dict[str, LoraChoice] = {}
    for choice in stack:
        strengths[choice.adapter_name] = strengths.get(choice.adapter_name, 0.0) + choice.strength
        files.setdefault(choice.adapter_name, choice)
    wanted = {name: strength for name, strength in strengths.items() if strength != 0}
    loaded = loaded_adapters(pipe)
    if not wanted:
        if loaded:
            pipe.unload_lora_weights()
        return
    stale = [name for name in loaded if name not in wanted]
    if stale:
        pipe.delete_adapters(stale)
    for name in wanted:
        if name not in loaded:
            _load_adapter(pipe, files[name])
    pipe.enable_lora()
    pipe.set_adapters(list(wanted), list(wanted.values()))
