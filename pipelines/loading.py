"""Recognise and convert the checkpoint layouts users already have, safely and offline.

Transformer layouts (all become diffusers ``WanTransformer3DModel`` key names):

- One-Forcing / Self-Forcing / CausVid ``.pt``: ``{"generator_ema" | "generator" | "model": {"model.<Wan key>": t}}``
  (a ``critic`` entry is ignored; FSDP wrappers leave ``_fsdp_wrapped_module.`` inside the keys);
- original Wan2.1 weights (``blocks.0.self_attn.q.weight`` ...), as ``.safetensors``, sharded or ``.pth``;
- ComfyUI single files (``model.diffusion_model.`` or ``diffusion_model.`` prefix), also fp8 and scaled fp8;
- files that already use diffusers names: one ``.safetensors``, a sharded ``*.safetensors.index.json``, or the folder
  that holds them (a diffusers ``transformer/`` folder, the original ``Wan2.1-T2V-1.3B/`` folder).

Single-file VAE (ComfyUI ``models/vae/wan_2.1_vae.safetensors``, original ``Wan2.1_VAE.pth``, diffusers names) and
UMT5 text encoder (ComfyUI ``models/text_encoders/umt5_xxl_*.safetensors``, original ``models_t5_umt5-xxl-enc-*.pth``,
transformers names or folder) loaders build their models from tensor shapes, never from the network.

Pickle-based files (``.pt .pth .ckpt .bin``) are read only with ``torch.load(weights_only=True)``: a file that needs
pickled code is refused. Every problem is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from .atomic import replaced_on_success
from .checks import non_finite_names, shown_names
from .fp8 import (
    FP8_STORAGE_DTYPE, SCALE_SUFFIX, UMT5_FP8_LAYERS, enable_fp8_storage, fp8_state_dict, stored_weight_keys,
)

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# entries of a training checkpoint, in order of preference (prefer_ema=False swaps the first two); export writes one
CHECKPOINT_ENTRIES = ("generator_ema", "generator", "model")
READ_ENTRIES = (*CHECKPOINT_ENTRIES, "state_dict")  # + Lightning-style files
# module wrappers that insert a path segment anywhere in a key (FSDP, activation checkpointing, torch.compile)
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# fp8 transformer weights are widened to this dtype (exact for e4m3/e5m2; the model normally runs in bf16)
TRANSFORMER_FP8_DTYPE = torch.bfloat16
# the model config a file records beside its weights: an entry of a ``.pt`` (what export writes), JSON text in the
# metadata of a ``.safetensors`` or in a sharded index's "metadata"
CONFIG_ENTRY = "config"
# settings shapes cannot show; a recorded config gives them (the rest is read from shapes, which it must agree with)
RECORDED_TRANSFORMER_KEYS = ("num_attention_heads", "attention_head_dim", "frames_per_block", "rope_max_seq_len")
# the released Wan2.1 transformers, recognised by (width, blocks): their head count (head size 128). A file that
# records no head count and is none of these is refused: shapes do not show the head count.
RELEASED_HEAD_COUNTS = {(1536, 30): 12, (5120, 40): 40}

_DIFFUSERS_TRANSFORMER_KEY = re.compile(
    r"""^(?:
        patch_embedding\.(?:weight|bias)
      | condition_embedder\.(?:time_embedder\.linear_[12]|text_embedder\.linear_[12]|time_proj)\.(?:weight|bias)
      | condition_embedder\.image_embedder\.(?:norm1|norm2|ff\.net\.0\.proj|ff\.net\.2)\.(?:weight|bias)
      | condition_embedder\.image_embedder\.pos_embed
      | blocks\.\d+\.(?:
            scale_shift_table
          | attn[12]\.(?:to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)\.(?:weight|bias)
          | attn[12]\.(?:norm_q|norm_k|norm_added_k)\.weight
          | norm2\.(?:weight|bias)
          | ffn\.net\.(?:0\.proj|2)\.(?:weight|bias))
      | scale_shift_table
      | proj_out\.(?:weight|bias)
    )$""",
    re.VERBOSE,
)
_ORIGINAL_MARKERS = re.compile(
    r"^(?:head\.|time_embedding\.|text_embedding\.|time_projection\.|img_emb\.)|\.(?:self_attn|cross_attn|modulation)\b"
)
_DIFFUSERS_MARKERS = re.compile(r"^(?:condition_embedder\.|proj_out\.|scale_shift_table)|\.(?:attn1|attn2)\.")

# diffusers -> original Wan2.1 names (the inverse of diffusers' convert_wan_transformer_to_diffusers)
_ORIGINAL_TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_ORIGINAL_BLOCK = {
    "norm2": "norm3",  # diffusers' norm2 is the affine cross-attention norm, the original's norm3
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_ORIGINAL_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
_ORIGINAL_PROJECTION = {
    "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k",
    "add_k_proj": "k_img", "add_v_proj": "v_img", "norm_added_k": "norm_k_img",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# -- reading files ------------------------------------------------------------------------------------------------
def read_checkpoint_tensors(path: str | os.PathLike, *, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a weights file, a sharded index, or a folder holding one of those.

    Training checkpoints give their ``generator_ema`` / ``generator`` / ``model`` entry (``prefer_ema`` picks EMA
    first), other pickle files must be a flat dict of tensors.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_dir():
        path = _weights_file_in_folder(path)
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _read_sharded(path, prefer_ema)
    if name.endswith(".safetensors"):
        return _read_safetensors(path)
    if name.endswith(PICKLE_SUFFIXES):
        return _pick_entry(path, _torch_load(path), prefer_ema)
    raise CheckpointError(
        path,
        f"unknown file type; expected .safetensors, a .safetensors.index.json or one of {', '.join(PICKLE_SUFFIXES)}",
    )


def _weights_file_in_folder(folder: Path) -> Path:
    """The one weights file of a folder: a sharded index, ``diffusion_pytorch_model.safetensors``,
    ``model.safetensors``, else the only ``.safetensors`` (or the only pickle file if there is no safetensors)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    for preferred in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / preferred).is_file():
            return folder / preferred
    if len(indexes) > 1:
        raise CheckpointError(folder, f"holds several sharded indexes ({_names(indexes)}); pass one of them")
    for suffixes in ((".safetensors",), PICKLE_SUFFIXES):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise CheckpointError(folder, f"holds several weights files ({_names(files)}); pass one of them")
    hint = ""
    if (folder / "model_index.json").is_file():
        hint = " (a diffusers pipeline folder: pass its transformer/, vae/ or text_encoder/ subfolder)"
    kinds = f".safetensors, index or {'/'.join(PICKLE_SUFFIXES)}"
    raise CheckpointError(folder, f"folder holds no weights file ({kinds}){hint}")


def _names(paths, limit: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(path, f"not a readable safetensors file ({err})") from err


def _torch_load(path: Path):
    """``torch.load`` that never runs pickled code; mmap where the file format allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # the old (non-zip) format cannot be mmapped: read it without
            raise _load_error(path, err) from err
    except Exception as err:
        raise _load_error(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _load_error(path, err) from err


def _load_error(path: Path, err: Exception) -> CheckpointError:
    if "Weights only load failed" in str(err):
        return _refuse_code(path, err)
    return CheckpointError(path, f"not a readable torch checkpoint ({type(err).__name__}: {err})")


def _refuse_code(path: Path, err: Exception) -> CheckpointError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found:
        what = f"it references {found.group(1)}"
    else:  # torch reports a damaged pickle stream through the same error
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(err), re.S)
        stop = detail.group(1) if detail else "unknown"
        what = f"the weights-only unpickler stopped at: {stop}; or the file is damaged"
    return CheckpointError(
        path,
        "refusing to unpickle code: the file holds objects other than tensors and plain containers "
        f"({what}), and it is only ever read with torch.load(weights_only=True). If you trust it, re-save its "
        "state dict as safetensors in a separate environment.",
    )


def _pick_entry(path: Path, obj, prefer_ema: bool) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    order = READ_ENTRIES if prefer_ema else ("generator", "generator_ema", *READ_ENTRIES[2:])
    chosen = next((entry for entry in order if isinstance(obj.get(entry), Mapping)), None)
    if chosen is not None:
        logger.info("%s: using the %r entry", path, chosen)
        obj = obj[chosen]
    where = f"entry {chosen!r}" if chosen else "the file"
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            path,
            f"{where} holds non-tensor values: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; expected {{name: tensor}} or one of the entries "
            f"{', '.join(READ_ENTRIES)}",
        )
    if not obj:
        raise CheckpointError(path, f"{where} holds no tensors")
    return {str(k): v for k, v in obj.items()}


def _read_sharded(index_path: Path, prefer_ema: bool) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise KeyError("weight_map")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(index_path, "not a sharded-checkpoint index (no weight_map)") from err
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(index_path, f"shard path {shard!r} leaves the index's folder")
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(index_path, f"shard {shard!r} is missing")
        if not shard.lower().endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(index_path, f"shard {shard!r} is not a weights file")
        tensors.update(read_checkpoint_tensors(shard_path, prefer_ema=prefer_ema))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(
            index_path, f"{len(missing)} keys of the index are in no shard (e.g. {', '.join(missing[:3])})"
        )
    return tensors


def read_recorded_config(path: str | os.PathLike) -> dict | None:
    """The model config a checkpoint records beside its weights, or None when it records none.

    Read from: the ``config.json`` of a diffusers model folder (or beside its ``diffusion_pytorch_model`` weights),
    the ``"config"`` entry of a ``.pt`` written by :func:`export_reference_checkpoint`, the ``"config"`` metadata
    (JSON text) of a ``.safetensors`` file or of a sharded index.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (path.is_dir() or path.name.startswith("diffusion_pytorch_model")) and (folder / "config.json").is_file():
        return _parse_config(folder / "config.json", (folder / "config.json").read_text())
    if path.is_dir():
        path = _weights_file_in_folder(path)
    name = path.name.lower()
    if name.endswith(".index.json"):
        try:
            text = (json.loads(path.read_text()).get("metadata") or {}).get(CONFIG_ENTRY)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
            raise CheckpointError(path, f"not a sharded-checkpoint index ({err})") from err
        return None if text is None else _parse_config(path, text)
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                text = (handle.metadata() or {}).get(CONFIG_ENTRY)
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(path, f"not a readable safetensors file ({err})") from err
        return None if text is None else _parse_config(path, text)
    if name.endswith(PICKLE_SUFFIXES):
        obj = _torch_load(path)
        recorded = obj.get(CONFIG_ENTRY) if isinstance(obj, Mapping) else None
        return None if recorded is None else _parse_config(path, recorded)
    return None


def _parse_config(path: Path, recorded) -> dict:
    """A recorded config (JSON text or a dict) -> dict; anything else is a :class:`CheckpointError`."""
    try:
        config = json.loads(recorded) if isinstance(recorded, str) else recorded
    except json.JSONDecodeError as err:
        raise CheckpointError(path, f"its recorded model config is not valid JSON ({err})") from err
    if not isinstance(config, Mapping):
        raise CheckpointError(path, f"its recorded model config is a {type(config).__name__}, expected a JSON object")
    return dict(config)


# -- key clean-up shared by all models -----------------------------------------------------------------------------
def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=TRANSFORMER_PREFIXES, path="<state dict>"):
    """Drop wrapper segments (``_fsdp_wrapped_module``...) anywhere in each key, then the leading ``prefixes``."""
    out: dict[str, torch.Tensor] = {}
    for original_key, value in state_dict.items():
        key = ".".join(part for part in original_key.split(".") if part not in WRAPPER_SEGMENTS)
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key in out:
            raise CheckpointError(path, f"key {original_key!r} collides with another key once prefixes are removed")
        out[key] = value
    return out


def split_fp8_scales(state_dict: Mapping[str, torch.Tensor], path="<state dict>"):
    """(tensors, scales): per-tensor fp8 scales taken out (ComfyUI's ``scaled_fp8`` files keep a
    ``<layer>.scale_weight`` scalar, the newer quantized format a ``<layer>.weight_scale``) as {weight key: scale},
    the other quantization bookkeeping dropped (``scaled_fp8`` marker, input scales, ``comfy_quant`` descriptions)."""
    out = dict(state_dict)
    out.pop("scaled_fp8", None)
    for key in [k for k in out if k.endswith((".scale_input", ".input_scale", ".comfy_quant"))]:
        del out[key]
    unsupported = [k for k in out if k.endswith((".weight_scale_2", ".pre_quant_scale"))]
    if unsupported:
        raise CheckpointError(path, f"uses a block-wise/fp4 quantization this loader does not read ({unsupported[0]})")
    scales = {}
    for key in [k for k in out if k.endswith((".scale_weight", ".weight_scale"))]:
        scale = out.pop(key)
        weight_key = key.rsplit(".", 1)[0] + ".weight"
        if weight_key not in out:
            raise CheckpointError(path, f"scale {key!r} has no weight {weight_key!r}")
        if scale.numel() != 1:
            raise CheckpointError(path, f"scale {key!r} is not per-tensor (shape {tuple(scale.shape)}); unsupported")
        scales[weight_key] = scale.float().reshape(())
    return out, scales


def widen_fp8(tensors: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor], dtype: torch.dtype,
              path="<state dict>", keep: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """fp8 tensors times their scale, widened to ``dtype``; those named in ``keep`` stay fp8 with their scale as
    ``<layer>.scale_weight`` (see ``fp8.py``). Integer-quantized weights are refused."""
    out = dict(tensors)
    for key, value in tensors.items():
        if key in keep and value.dtype == FP8_STORAGE_DTYPE:
            out[key[: -len(".weight")] + SCALE_SUFFIX] = scales.get(key, torch.ones(()))
        elif value.dtype in FP8_DTYPES:
            scale = scales.get(key)
            out[key] = value.to(dtype) if scale is None else (value.float() * scale).to(dtype)
        elif value.dtype in (torch.int8, torch.uint8) and value.ndim > 1:
            raise CheckpointError(path, f"{key!r} is an integer-quantized weight ({value.dtype}); unsupported")
    return out


def dequantize_fp8(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, path="<state dict>"):
    """Every fp8 weight widened to ``dtype`` with its per-tensor scale applied (:func:`split_fp8_scales`)."""
    return widen_fp8(*split_fp8_scales(state_dict, path), dtype, path)


# -- transformer ---------------------------------------------------------------------------------------------------
def to_diffusers_names(state_dict: Mapping[str, torch.Tensor], path="<state dict>",
                       keep_fp8: re.Pattern | None = None) -> dict[str, torch.Tensor]:
    """Any supported Wan transformer state dict (prefixed, wrapped, original or diffusers names) -> diffusers
    ``WanTransformer3DModel`` names. Every key must be accounted for. fp8 weights are widened, except the
    float8_e4m3fn weights of layers ``keep_fp8`` names (diffusers names), kept with their ``scale_weight``."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    tensors, scales = split_fp8_scales(strip_prefixes(state_dict, path=path), path)
    for key in [k for k in tensors if k.endswith(".norm_added_q.weight")]:
        del tensors[key]  # written by some diffusers versions, never used (diffusers ignores it on load too)
    keys = list(tensors)
    original = [k for k in keys if _ORIGINAL_MARKERS.search(k)]
    diffusers_style = [k for k in keys if _DIFFUSERS_MARKERS.search(k)]
    if "patch_embedding.weight" not in tensors or not (original or diffusers_style):
        raise CheckpointError(
            path, f"not a Wan transformer checkpoint: unknown layout (first keys: {', '.join(keys[:5]) or 'none'})"
        )
    if original and diffusers_style:
        raise CheckpointError(
            path, f"mixes original Wan names ({original[0]}) and diffusers names ({diffusers_style[0]})"
        )
    if original:
        converted = convert_wan_transformer_to_diffusers(dict(tensors))
        if len(converted) != len(tensors):
            raise CheckpointError(path, "two original keys map to the same diffusers key")
        tensors = converted
        scales = convert_wan_transformer_to_diffusers(dict(scales))  # keyed by their weights' names
    unknown = [k for k in tensors if not _DIFFUSERS_TRANSFORMER_KEY.match(k)]
    if unknown:
        raise CheckpointError(
            path,
            f"{len(unknown)} keys are not part of a Wan2.1 transformer (e.g. {', '.join(unknown[:3])}); "
            "VACE, LoRA and other add-on weights are not supported",
        )
    keep = frozenset() if keep_fp8 is None else stored_weight_keys(tensors, keep_fp8)
    return widen_fp8(tensors, scales, TRANSFORMER_FP8_DTYPE, path, keep)


def load_transformer_state_dict(path: str | os.PathLike, *, prefer_ema: bool = True,
                                keep_fp8: re.Pattern | None = None) -> dict[str, torch.Tensor]:
    """Read a Wan transformer checkpoint in any supported layout, keyed by diffusers ``WanTransformer3DModel`` names.

    Args:
        path: a ``.pt/.pth/.ckpt/.bin``, ``.safetensors``, ``*.safetensors.index.json``, or a folder holding one.
        prefer_ema: take ``generator_ema`` before ``generator`` in training checkpoints (False: the reverse).
        keep_fp8: layers whose float8_e4m3fn weights stay fp8 (see :func:`to_diffusers_names`).
    """
    path = Path(path)
    tensors = read_checkpoint_tensors(path, prefer_ema=prefer_ema)
    return check_finite(to_diffusers_names(tensors, path, keep_fp8), path)


def check_finite(state_dict: Mapping[str, torch.Tensor], path="<state dict>") -> Mapping[str, torch.Tensor]:
    """``state_dict`` itself, or a :class:`CheckpointError` naming the tensors that hold NaN or Inf values (a damaged
    or diverged checkpoint would otherwise make black or noisy videos without a word)."""
    bad = non_finite_names(state_dict.items())
    if bad:
        raise CheckpointError(path, f"holds non-finite weights (NaN or Inf) in {shown_names(bad)}")
    return state_dict


def infer_transformer_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    recorded: Mapping | None = None,
    path="<state dict>",
) -> dict:
    """The ``WanTransformer3DModel`` config of a diffusers-named state dict, read from tensor shapes.

    The number of heads is not visible in shapes: ``num_attention_heads`` if given, else the one the file records
    (``recorded``: :func:`read_recorded_config`, which also gives ``frames_per_block`` and ``rope_max_seq_len``),
    else that of a released Wan2.1 model of the same width and depth (1.3B: 1536 x 30 blocks -> 12 heads, 14B:
    5120 x 40 -> 40); otherwise a :class:`CheckpointError`. A given count that contradicts the file's is refused.
    """
    try:
        patch = state_dict["patch_embedding.weight"]  # [dim, in_channels, pt, ph, pw]
        dim, in_channels = int(patch.shape[0]), int(patch.shape[1])
        patch_size = tuple(int(s) for s in patch.shape[2:])
        block_ids = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
        if not block_ids or block_ids != list(range(len(block_ids))):
            raise CheckpointError(path, f"transformer blocks are not numbered 0..N-1 (found {block_ids[:8]})")
        proj_out = state_dict["proj_out.weight"]  # [out_channels * pt * ph * pw, dim]
        config = dict(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=int(proj_out.shape[0]) // (patch_size[0] * patch_size[1] * patch_size[2]),
            text_dim=int(state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
            freq_dim=int(state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1]),
            ffn_dim=int(state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0]),
            num_layers=len(block_ids),
            cross_attn_norm="blocks.0.norm2.weight" in state_dict,
            qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state_dict else None,
            eps=1e-6,
            image_dim=None,
            added_kv_proj_dim=None,
        )
    except KeyError as err:
        raise CheckpointError(path, f"cannot infer the transformer config: missing {err}") from err
    except (IndexError, ValueError) as err:
        raise CheckpointError(path, f"cannot infer the transformer config: unexpected shapes ({err})") from err
    if "condition_embedder.image_embedder.norm1.weight" in state_dict:
        config["image_dim"] = int(state_dict["condition_embedder.image_embedder.norm1.weight"].shape[0])
    if "blocks.0.attn2.add_k_proj.weight" in state_dict:
        config["added_kv_proj_dim"] = int(state_dict["blocks.0.attn2.add_k_proj.weight"].shape[1])
    if "condition_embedder.image_embedder.pos_embed" in state_dict:
        config["pos_embed_seq_len"] = int(state_dict["condition_embedder.image_embedder.pos_embed"].shape[1])
    recorded = {k: v for k, v in (recorded or {}).items() if k in RECORDED_TRANSFORMER_KEYS}
    heads = _head_count(dim, config["num_layers"], num_attention_heads, recorded, path)
    head_dim = recorded.get("attention_head_dim", dim // heads)
    if heads * head_dim != dim:
        raise CheckpointError(path, f"its recorded config gives {heads} heads x {head_dim}, but the width is {dim}")
    return {**config, **recorded, "num_attention_heads": heads, "attention_head_dim": head_dim}


def _head_count(dim: int, layers: int, given: int | None, recorded: Mapping, path) -> int:
    """The number of attention heads: given, else recorded in the file, else a released Wan2.1 model's; never
    guessed (shapes do not show it: 4 heads x 64 and 2 x 128 have the same weights)."""
    in_file = recorded.get("num_attention_heads")
    for value, origin in ((given, "num_attention_heads"), (in_file, "the recorded num_attention_heads")):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0
                                  or dim % value):
            raise CheckpointError(path, f"{origin}={value!r} does not divide the model width {dim}")
    if given is not None and in_file is not None and given != in_file:
        raise CheckpointError(path, f"records num_attention_heads={in_file}, but {given} was asked for")
    heads = given or in_file or RELEASED_HEAD_COUNTS.get((dim, layers))
    if heads is None:
        released = ", ".join(f"width {w} x {n} blocks" for w, n in RELEASED_HEAD_COUNTS)
        raise CheckpointError(
            path,
            f"records no number of attention heads, and its shape (width {dim}, {layers} blocks) is no released "
            f"Wan2.1 model's ({released}), so the head count is unknown: pass num_attention_heads (CLI "
            "--num-attention-heads, the loader node's num_attention_heads input); it is never guessed",
        )
    return int(heads)


def check_state_dict_matches(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and wrongly shaped keys (the first few of each)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        shown = "; ".join(f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}" for k in wrong[:3])
        problems.append(f"{len(wrong)} keys with mismatched shapes ({shown})")
    if problems:
        raise CheckpointError(path, f"does not fit {type(model).__name__}: " + "; ".join(problems))


def to_original_names(state_dict: Mapping[str, torch.Tensor], path="<state dict>") -> dict[str, torch.Tensor]:
    """diffusers ``WanTransformer3DModel`` names -> original Wan2.1 names (inverse of :func:`to_diffusers_names`)."""
    out = {}
    for key, value in state_dict.items():
        new = _original_name(key)
        if new is None:
            raise CheckpointError(path, f"cannot name {key!r} in the original Wan2.1 layout")
        out[new] = value
    return out


def _original_name(key: str) -> str | None:
    if key == "scale_shift_table":
        return "head.modulation"
    module, _, param = key.rpartition(".")
    if module in _ORIGINAL_TOP_LEVEL and param in ("weight", "bias"):
        return f"{_ORIGINAL_TOP_LEVEL[module]}.{param}"
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match is None:
        return None
    index, rest = match.groups()
    if rest == "scale_shift_table":
        return f"blocks.{index}.modulation"
    module, _, param = rest.rpartition(".")
    if module in _ORIGINAL_BLOCK:
        return f"blocks.{index}.{_ORIGINAL_BLOCK[module]}.{param}"
    attention, _, projection = module.partition(".")
    if attention in _ORIGINAL_ATTENTION and projection in _ORIGINAL_PROJECTION:
        return f"blocks.{index}.{_ORIGINAL_ATTENTION[attention]}.{_ORIGINAL_PROJECTION[projection]}.{param}"
    return None


def export_reference_checkpoint(
    state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: str | os.PathLike,
    *,
    entry: str = "generator_ema",
    config: Mapping | None = None,
) -> Path:
    """Write the reference ``.pt`` layout, ``{entry: {"model.<original Wan2.1 key>": tensor}, "config": {...}}`` with
    ``torch.save``, readable by the One-Forcing / Self-Forcing code (which reads ``entry`` only) and by
    :func:`load_transformer_state_dict`.

    ``config``: the model's config, recorded so that loaders read the head count and block size instead of guessing
    them (default: the module's own when ``state_dict`` is a module, else what :func:`infer_transformer_config`
    knows, which refuses shapes of unknown head count).
    """
    path = Path(path)
    if entry not in CHECKPOINT_ENTRIES:
        raise CheckpointError(path, f"entry must be one of {', '.join(CHECKPOINT_ENTRIES)}, got {entry!r}")
    if isinstance(state_dict, torch.nn.Module):
        config = config if config is not None else getattr(state_dict, "config", None)
        state_dict = state_dict.state_dict()
    if path.is_dir():
        raise CheckpointError(path, "is a folder; the reference checkpoint is one file (e.g. one_forcing.pt)")
    unknown = [k for k in state_dict if not _DIFFUSERS_TRANSFORMER_KEY.match(k)]
    if unknown:
        raise CheckpointError(path, f"not a diffusers Wan transformer state dict (e.g. {', '.join(unknown[:3])})")
    if config is None:
        config = infer_transformer_config(state_dict, path=path)
    recorded = json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))
    if not isinstance(recorded.get("num_attention_heads"), int):
        raise CheckpointError(path, f"the model config gives no num_attention_heads (keys: {sorted(recorded)[:8]})")
    original = to_original_names(state_dict, path)
    payload = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in original.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_on_success(path) as partial:  # never a half-written checkpoint under the final name
        torch.save({entry: payload, CONFIG_ENTRY: recorded}, partial)
    return path


# -- VAE -----------------------------------------------------------------------------------------------------------
def infer_wan_vae_config(state_dict: Mapping[str, torch.Tensor], path="<state dict>") -> dict:
    """``AutoencoderKLWan`` config (base_dim, decoder_base_dim, z_dim, dim_mult, num_res_blocks,
    temperal_downsample) of a diffusers-named Wan2.1 VAE state dict, from tensor shapes."""
    try:
        base_dim = int(state_dict["encoder.conv_in.weight"].shape[0])
        z_dim = int(state_dict["post_quant_conv.weight"].shape[0])
        decoder_in = int(state_dict["decoder.conv_in.weight"].shape[0])  # decoder_base_dim * dim_mult[-1]
        # the encoder's flat down_blocks list: per level, residual blocks then (except last) one resample
        levels: list[list[int]] = [[]]  # output channels of each level's residual blocks
        temporal: list[bool] = []
        index = 0
        while f"encoder.down_blocks.{index}.resample.1.weight" in state_dict or \
                f"encoder.down_blocks.{index}.conv1.weight" in state_dict:
            prefix = f"encoder.down_blocks.{index}."
            if prefix + "conv1.weight" in state_dict:
                levels[-1].append(int(state_dict[prefix + "conv1.weight"].shape[0]))
            else:
                temporal.append(prefix + "time_conv.weight" in state_dict)
                levels.append([])
            index += 1
    except KeyError as err:
        raise CheckpointError(path, f"cannot infer the VAE config: missing {err}") from err
    resnets = {len(level) for level in levels}
    if not levels[0] or len(resnets) != 1 or any(len(set(level)) != 1 for level in levels):
        raise CheckpointError(path, "cannot infer the VAE config: irregular encoder blocks")
    dim_mult = [level[0] // base_dim for level in levels]
    if any(level[0] % base_dim for level in levels) or decoder_in % dim_mult[-1]:
        raise CheckpointError(path, "cannot infer the VAE config: channel counts are not multiples of the base width")
    decoder_base_dim = decoder_in // dim_mult[-1]
    return dict(
        base_dim=base_dim,
        decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim,
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=resnets.pop(),
        temperal_downsample=temporal,
    )


def load_wan_vae_single_file(path: str | os.PathLike, dtype: torch.dtype | None = None, **config_overrides):
    """A Wan2.1 VAE from one file -> diffusers ``AutoencoderKLWan`` (float32 unless ``dtype``).

    Reads ComfyUI's ``models/vae/wan_2.1_vae.safetensors`` and the original ``Wan2.1_VAE.pth`` (original Wan VAE key
    names, converted with diffusers' ``convert_wan_vae_to_diffusers``), a file with diffusers names, or a diffusers
    ``vae/`` folder. The config is the Wan2.1 VAE's (latent statistics included) with sizes read from tensor shapes;
    ``config_overrides`` replace any of it.
    """
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _cast(AutoencoderKLWan.from_pretrained(path), dtype).eval()
    tensors = read_checkpoint_tensors(path)
    tensors = _strip_common_prefix(tensors, ("first_stage_model.", "vae.", "model."))
    tensors = dequantize_fp8(tensors, torch.float32, path)
    if "decoder.conv1.weight" in tensors or "conv2.weight" in tensors:
        tensors = convert_wan_vae_to_diffusers(tensors)
    if "decoder.conv_in.weight" not in tensors or "post_quant_conv.weight" not in tensors:
        raise CheckpointError(
            path,
            f"not a Wan VAE checkpoint: no decoder.conv1/conv_in weights (first keys: {', '.join(list(tensors)[:5])})",
        )
    z_dim = int(tensors["post_quant_conv.weight"].shape[0])
    if any(".resnets." in k for k in tensors if k.startswith("encoder.down_blocks.")) or z_dim == 48:
        raise CheckpointError(path, "is a Wan2.2 VAE; only the Wan2.1 VAE (16 latent channels) is supported")
    if z_dim != 16 and "latents_mean" not in config_overrides:
        raise CheckpointError(
            path, f"has {z_dim} latent channels, the Wan2.1 VAE 16 (pass latents_mean and latents_std to override)"
        )
    check_finite(tensors, path)
    config = {**infer_wan_vae_config(tensors, path), **config_overrides}
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    check_state_dict_matches(vae, tensors, path)
    vae.load_state_dict(tensors, strict=True, assign=True)
    return _cast(vae, dtype).eval()


def _strip_common_prefix(state_dict: Mapping[str, torch.Tensor], prefixes) -> dict[str, torch.Tensor]:
    """Remove a prefix only when every key carries it (a merged checkpoint's component prefix)."""
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _cast(model: torch.nn.Module, dtype: torch.dtype | None, keep_fp32: tuple[str, ...] = ()) -> torch.nn.Module:
    """Cast floating parameters to ``dtype`` (float32 when None), leaving modules named in ``keep_fp32`` in float32
    and fp8-stored weights in fp8."""
    dtype = dtype or torch.float32
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != FP8_STORAGE_DTYPE:
            wide = any(part in keep_fp32 for part in name.split("."))
            param.data = param.data.to(torch.float32 if wide else dtype)
    return model


# -- UMT5 text encoder -----------------------------------------------------------------------------------------------
_UMT5_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
# original Wan ``T5Encoder`` -> transformers ``UMT5EncoderModel`` (per block, then top level)
_UMT5_FROM_WAN_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_UMT5_FROM_WAN_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


def _umt5_names(tensors: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """transformers UMT5 names from a ComfyUI / transformers file (any component prefix) or an original Wan T5."""
    probe = next((k for k in tensors if k.endswith(_UMT5_PROBE)), None)
    if probe is not None:
        prefix = probe[: -len(_UMT5_PROBE)]
        ignored = [k for k in tensors if not k.startswith(prefix)]
        if prefix and ignored:
            logger.info("%s: ignoring %d keys outside %r", path, len(ignored), prefix)
        out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        out.pop("spiece_model", None)  # ComfyUI may embed the sentencepiece model as a uint8 tensor
        # a full encoder-decoder file: keep the encoder
        return {k: v for k, v in out.items() if not k.startswith(("decoder.", "lm_head."))}
    if "token_embedding.weight" in tensors and "blocks.0.attn.q.weight" in tensors:
        out = {}
        for key, value in tensors.items():
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
            if match and match.group(2) in _UMT5_FROM_WAN_BLOCK:
                out[f"encoder.block.{match.group(1)}.{_UMT5_FROM_WAN_BLOCK[match.group(2)]}"] = value
            elif key in _UMT5_FROM_WAN_TOP:
                out[_UMT5_FROM_WAN_TOP[key]] = value
            else:
                raise CheckpointError(path, f"unknown key {key!r} in an original Wan T5 encoder file")
        return out
    raise CheckpointError(
        path, f"not a UMT5 encoder checkpoint (no {_UMT5_PROBE}; first keys: {', '.join(list(tensors)[:5])})"
    )


def infer_umt5_config(state_dict: Mapping[str, torch.Tensor], path="<state dict>"):
    """``UMT5Config`` of a transformers-named UMT5 encoder state dict (vocab, d_model, d_kv, d_ff, layers, heads,
    relative-attention buckets from shapes; ``relative_attention_max_distance`` 128 and eps 1e-6 as in every UMT5)."""
    from transformers import UMT5Config

    block = "encoder.block.{}.layer.{}"
    try:
        embed = state_dict.get("shared.weight", state_dict.get("encoder.embed_tokens.weight"))
        if embed is None:
            raise KeyError("shared.weight")
        layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.block."))
        bias = state_dict[block.format(0, 0) + ".SelfAttention.relative_attention_bias.weight"]  # [buckets, heads]
        query = state_dict[block.format(0, 0) + ".SelfAttention.q.weight"]  # [heads * d_kv, d_model]
        if block.format(0, 1) + ".DenseReluDense.wi.weight" in state_dict:
            raise CheckpointError(path, "has an ungated feed-forward (T5 v1.0), not UMT5's gated GELU")
        d_ff = int(state_dict[block.format(0, 1) + ".DenseReluDense.wi_0.weight"].shape[0])
    except KeyError as err:
        raise CheckpointError(path, f"cannot infer the UMT5 config: missing {err}") from err
    if layers > 1 and block.format(1, 0) + ".SelfAttention.relative_attention_bias.weight" not in state_dict:
        raise CheckpointError(path, "shares one relative-position bias across layers (T5), UMT5 has one per layer")
    heads = int(bias.shape[1])
    return UMT5Config(
        vocab_size=int(embed.shape[0]),
        d_model=int(embed.shape[1]),
        d_kv=int(query.shape[0]) // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=int(bias.shape[0]),
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )


def load_umt5_encoder_single_file(path: str | os.PathLike, dtype: torch.dtype | None = None,
                                  storage_dtype: torch.dtype | None = None):
    """A UMT5 text encoder -> transformers ``UMT5EncoderModel`` (float32 unless ``dtype``), config from shapes.

    Reads one ``.safetensors`` with transformers names (ComfyUI ``text_encoders/umt5_xxl_*``: possibly a component
    prefix, an embedded ``spiece_model``, fp8 or scaled-fp8 weights), the original Wan
    ``models_t5_umt5-xxl-enc-*.pth``, or a transformers folder with ``config.json``. As transformers does, float16
    keeps the feed-forward output projections (``wo``) in float32.

    ``storage_dtype``: ``torch.float8_e4m3fn`` stores the encoder's linear weights in fp8 (``fp8.py``); None keeps a
    file's fp8 weights fp8 (no wider copy is made) and widens nothing else; any other dtype widens every fp8 weight
    to ``dtype``.
    """
    from transformers import UMT5EncoderModel

    path = Path(path)
    keep_fp32 = tuple(UMT5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()
    if path.is_dir() and (path / "config.json").is_file():
        model = _cast(UMT5EncoderModel.from_pretrained(path), dtype, keep_fp32).eval()
        if storage_dtype == FP8_STORAGE_DTYPE:
            enable_fp8_storage(model, UMT5_FP8_LAYERS, dtype or torch.float32)
        return model
    check_storage_dtype(storage_dtype)
    tensors, scales = split_fp8_scales(_umt5_names(read_checkpoint_tensors(path), path), path)
    keep = stored_weight_keys(tensors, UMT5_FP8_LAYERS) if storage_dtype in (None, FP8_STORAGE_DTYPE) else frozenset()
    tensors = check_finite(widen_fp8(tensors, scales, dtype or torch.float32, path, keep), path)
    config = infer_umt5_config(tensors, path)
    embed = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
    tensors.setdefault("shared.weight", embed)
    tensors.setdefault("encoder.embed_tokens.weight", embed)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    tensors = with_fp8_storage(model, tensors, UMT5_FP8_LAYERS, storage_dtype, dtype or torch.float32)
    check_state_dict_matches(model, tensors, path)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return _cast(model, dtype, keep_fp32).eval()


def load_transformer(path: str | os.PathLike, dtype: torch.dtype | None = None,
                     num_attention_heads: int | None = None, storage_dtype: torch.dtype | None = None):
    """A :class:`~.transformer_causal_wan.CausalWanTransformer3DModel` from ``path``: a diffusers model folder (it
    holds ``config.json``) through ``from_pretrained``, anything else (a weights file, a folder of original or sharded
    weights) through ``from_single_file`` (``num_attention_heads`` for files that record none). ``storage_dtype`` as
    ``from_single_file`` takes it (``torch.float8_e4m3fn``: fp8 weight storage). Every failure is a
    :class:`CheckpointError` naming ``path``."""
    from .transformer_causal_wan import CausalWanTransformer3DModel

    path = Path(path)
    check_storage_dtype(storage_dtype)
    try:
        if path.is_dir() and (path / "config.json").is_file():
            model = CausalWanTransformer3DModel.from_pretrained(path, dtype=dtype)
            if storage_dtype == FP8_STORAGE_DTYPE:
                model.enable_fp8_storage()
            return model
        return CausalWanTransformer3DModel.from_single_file(path, dtype=dtype, num_attention_heads=num_attention_heads,
                                                            storage_dtype=storage_dtype)
    except CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(path, f"cannot load the transformer: {err}") from err


# -- fp8 storage -------------------------------------------------------------------------------------------------
def check_storage_dtype(storage_dtype: torch.dtype | None) -> None:
    """Refuse a weight storage dtype other than None (as the file stores it), float8_e4m3fn or a float dtype."""
    if storage_dtype not in (None, FP8_STORAGE_DTYPE, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"storage_dtype must be None, torch.float8_e4m3fn or a float dtype, got {storage_dtype}")


def with_fp8_storage(model: torch.nn.Module, tensors: dict[str, torch.Tensor], pattern: re.Pattern,
                      storage_dtype: torch.dtype | None, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Give the (meta) ``model`` fp8 storage when ``storage_dtype`` asks for it or (None) the file's layers are fp8
    already; returns ``tensors`` in the layout the model then loads (fp8 weights + ``scale_weight``)."""
    stored = stored_weight_keys(model.state_dict(), pattern)
    in_file = any(tensors[k].dtype == FP8_STORAGE_DTYPE for k in stored if k in tensors)
    if storage_dtype != FP8_STORAGE_DTYPE and not (storage_dtype is None and in_file):
        return tensors
    if storage_dtype is None:
        logger.info("keeping the file's fp8 weights in fp8 (weight-only storage, computed in %s)", compute_dtype)
    enable_fp8_storage(model, pattern, compute_dtype)
    return fp8_state_dict(tensors, stored)
