"""Recognise and convert the checkpoint layouts users already have, safely and offline.

Transformer layouts (all become diffusers ``WanTransformer3DModel`` key names):
- One-Forcing / Self-Forcing / CausVid ``.pt``: ``{"generator_ema" | "generator" | "model": {"model.<Wan key>": t}}``,
  sometimes with ``_fsdp_wrapped_module.`` inside the keys;
- original Wan2.1 ``.safetensors`` (``blocks.0.self_attn.q.weight``...);
- ComfyUI single files (``model.diffusion_model.`` prefix);
- files that already use diffusers names (one ``.safetensors`` or a sharded ``*.safetensors.index.json``).
``.pt`` files are read only with ``torch.load(weights_only=True)``: a file that needs pickled code is refused.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "_fsdp_wrapped_module.", "model.")
ORIGINAL_MARKERS = ("self_attn.", "cross_attn.", "head.head.", "time_embedding.", "text_embedding.")
DIFFUSERS_MARKERS = ("attn1.", "attn2.", "condition_embedder.", "proj_out.")

# original Wan2.1 name -> diffusers name, for the export direction (the import direction uses diffusers' converter)
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # diffusers norm2 is the affine cross-attention norm, original norm3
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


# -- reading files ------------------------------------------------------------------------------------------------
def _read_tensors(path: Path, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors, a sharded index or a .pt-like file."""
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(
            path, "is a folder; pass a weights file, or load a diffusers folder with from_pretrained"
        )
    name = path.name.lower()
    if name.endswith(".safetensors.index.json"):
        return _read_sharded(path)
    if name.endswith(".safetensors"):
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(path, f"not a readable safetensors file ({err})") from err
    if name.endswith(PICKLE_SUFFIXES):
        return _pick_entry(path, _torch_load(path), prefer_ema)
    raise CheckpointError(path, f"unknown file type; expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            path, "refusing to unpickle code: the file holds more than tensors and plain containers "
            "(torch.load weights_only=True failed). Re-save it as safetensors from a trusted environment."
        ) from err
    except RuntimeError as err:
        # mmap needs the new zip format; old-format files are read without it
        if "mmap" not in str(err):
            raise CheckpointError(path, f"not a readable torch checkpoint ({err})") from err
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err2:
            raise CheckpointError(path, "refusing to unpickle code (weights_only=True failed)") from err2


def _pick_entry(path: Path, obj, prefer_ema: bool) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    order = ("generator_ema", "generator") if prefer_ema else ("generator", "generator_ema")
    for entry in (*order, "model", "state_dict"):
        if isinstance(obj.get(entry), dict):
            obj = obj[entry]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            path, f"no tensors found (top-level entries: {', '.join(map(str, list(obj)[:8]))})"
        )
    return tensors


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(index_path, "not a safetensors index (no weight_map)") from err
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(index_path, f"shard path {shard!r} leaves the folder")
        tensors.update(_read_tensors(shard_path))
    return tensors


# -- transformer ---------------------------------------------------------------------------------------------------
def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key.replace("._fsdp_wrapped_module", "")] = value
    return out


def to_diffusers_names(state_dict: dict[str, torch.Tensor], path="<state dict>") -> dict[str, torch.Tensor]:
    """Any supported Wan transformer state dict -> diffusers ``WanTransformer3DModel`` names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    stripped = _strip_prefixes(state_dict)
    keys = list(stripped)
    original = sum(any(m in k for m in ORIGINAL_MARKERS) for k in keys)
    diffusers_style = sum(any(m in k for m in DIFFUSERS_MARKERS) for k in keys)
    if "patch_embedding.weight" not in stripped or (original == 0 and diffusers_style == 0):
        sample = ", ".join(keys[:5])
        raise CheckpointError(path, f"not a Wan transformer checkpoint (unknown layout; first keys: {sample})")
    if original and diffusers_style:
        raise CheckpointError(path, "mixes original Wan and diffusers key names")
    if diffusers_style:
        return stripped
    return convert_wan_transformer_to_diffusers(dict(stripped))


def load_transformer_state_dict(path: str | os.PathLike, *, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read a transformer checkpoint in any supported layout, keyed by diffusers names."""
    path = Path(path)
    return to_diffusers_names(_read_tensors(path, prefer_ema), path)


def infer_transformer_config(state_dict: dict[str, torch.Tensor], *, num_attention_heads: int | None = None) -> dict:
    """The ``WanTransformer3DModel`` config of a diffusers-named state dict, read from tensor shapes.

    Heads are not visible in shapes: ``num_attention_heads`` if given, else head size 128 (all Wan2.1 models).
    """
    try:
        patch = state_dict["patch_embedding.weight"]  # [dim, in_channels, pt, ph, pw]
        dim, in_channels = patch.shape[:2]
        patch_size = tuple(patch.shape[2:])
        num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        out_channels = state_dict["proj_out.weight"].shape[0] // int(torch.tensor(patch_size).prod())
        config = dict(
            patch_size=patch_size,
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            text_dim=int(state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
            freq_dim=int(state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1]),
            ffn_dim=int(state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0]),
            num_layers=num_layers,
            cross_attn_norm="blocks.0.norm2.weight" in state_dict,
            qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state_dict else None,
            eps=1e-6,
        )
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError("<state dict>", f"cannot infer the transformer config (missing {err})") from err
    if "condition_embedder.image_embedder.ff.net.0.proj.weight" in state_dict:
        config["image_dim"] = int(state_dict["condition_embedder.image_embedder.ff.net.0.proj.weight"].shape[1])
        config["added_kv_proj_dim"] = int(dim)
    if num_attention_heads is None:
        if dim % 128:
            raise CheckpointError(
                "<state dict>", f"width {dim} is not a multiple of 128: pass num_attention_heads explicitly"
            )
        num_attention_heads = dim // 128
    if dim % num_attention_heads:
        raise CheckpointError("<state dict>", f"width {dim} is not divisible by {num_attention_heads} heads")
    config["num_attention_heads"] = int(num_attention_heads)
    config["attention_head_dim"] = int(dim // num_attention_heads)
    return config


def check_state_dict_matches(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and wrongly shaped keys."""
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
        raise CheckpointError(path, "does not fit the model: " + "; ".join(problems))


def to_original_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``WanTransformer3DModel`` names -> original Wan2.1 names (the inverse of ``to_diffusers_names``)."""
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":
            new = "head.modulation"
        elif key.startswith("proj_out."):
            new = "head.head." + key[len("proj_out."):]
        elif key.endswith(".scale_shift_table"):
            new = key.replace(".scale_shift_table", ".modulation")
        else:
            new = key
            for src, dst in _TO_ORIGINAL:
                new = new.replace(src, dst)
        out[new] = value
    return out


def export_reference_checkpoint(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, entry: str = "generator_ema"
) -> Path:
    """Write the reference ``.pt`` layout, ``{entry: {"model.<original key>": tensor}}``, readable by the
    One-Forcing / Self-Forcing code and by :func:`load_transformer_state_dict`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    original = {f"model.{k}": v.detach().cpu().contiguous() for k, v in to_original_names(state_dict).items()}
    torch.save({entry: original}, path)
    return path


# -- VAE and text encoder single files ------------------------------------------------------------------------------
def load_wan_vae_single_file(path: str | os.PathLike, dtype: torch.dtype | None = None, **config):
    """ComfyUI's ``models/vae/wan_2.1_vae.safetensors`` (original Wan VAE keys) or a diffusers-keyed file ->
    ``AutoencoderKLWan`` (Wan2.1 VAE config unless ``config`` overrides it)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = Path(path)
    tensors = _strip_prefixes(_read_tensors(path))
    if "decoder.conv1.weight" in tensors or "conv1.weight" in tensors:
        tensors = convert_wan_vae_to_diffusers(dict(tensors))
    if "decoder.conv_in.weight" not in tensors:
        raise CheckpointError(path, "not a Wan VAE checkpoint (no decoder.conv_in / decoder.conv1 weights)")
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    check_state_dict_matches(vae, tensors, path)
    vae.load_state_dict(tensors, strict=True, assign=True)
    return vae.to(dtype).eval() if dtype is not None else vae.eval()


def load_umt5_encoder_single_file(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """A UMT5 encoder in one ``.safetensors`` (ComfyUI ``text_encoders/umt5_xxl_*``, HF key names) or a transformers
    folder -> ``UMT5EncoderModel``; the config is read from tensor shapes, fp8 weights are upcast."""
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(path, "folder has no config.json (not a transformers text encoder folder)")
        return UMT5EncoderModel.from_pretrained(path, dtype=dtype)
    tensors = _read_tensors(path)
    scales = {k[: -len(".scale_weight")]: v for k, v in tensors.items() if k.endswith(".scale_weight")}
    tensors = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "shared."))}
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" not in tensors:
        raise CheckpointError(path, "not a UMT5 encoder checkpoint (no shared/encoder.embed_tokens weights)")
    wide = dtype or torch.float32
    for key, value in list(tensors.items()):
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            value = value.to(torch.float32)
            scale = scales.get(key[: -len(".weight")])
            tensors[key] = (value * scale.float() if scale is not None else value).to(wide)
    embed = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
    tensors.setdefault("shared.weight", embed)
    tensors.setdefault("encoder.embed_tokens.weight", embed)
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.block."))
    bias = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # [buckets, heads]
    q = tensors["encoder.block.0.layer.0.SelfAttention.q.weight"]  # [heads * d_kv, d_model]
    config = UMT5Config(
        vocab_size=embed.shape[0],
        d_model=embed.shape[1],
        d_kv=q.shape[0] // bias.shape[1],
        d_ff=tensors["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=layers,
        num_heads=bias.shape[1],
        relative_attention_num_buckets=bias.shape[0],
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = set(model.state_dict())
    check_state_dict_matches(model, {k: v for k, v in tensors.items() if k in expected or k.startswith("encoder.")}, path)
    model.load_state_dict({k: tensors[k] for k in expected}, strict=True, assign=True)
    model.tie_weights()
    return (model.to(dtype) if dtype is not None else model.float()).eval()
