"""Loading the models from a chosen file or folder (see ``folders.py``), through ``pipelines/loading.py``: the
transformer, the text encoder, the Wan VAE and the tiny preview VAE (``pipelines/tiny_vae.py``).

Every loaded model is wrapped for ComfyUI's model management (``runtime.manage``): ComfyUI moves it to the GPU
when a node needs it and offloads it when another model needs the room.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..pipelines.loading import (
    CheckpointError,
    check_state_dict_matches,
    infer_wan_vae_config,
    load_transformer as load_causal_transformer,
    load_umt5_encoder_single_file,
    load_wan_vae_single_file,
)
from ..pipelines.lora import LoraChoice, choose_lora_file
from ..pipelines.pipeline_one_forcing import OneForcingPipeline
from ..pipelines.presets import resolve_dtype, storage_dtype
from ..pipelines.scheduling_one_forcing import OneForcingScheduler
from ..pipelines.tiny_vae import TinyWanVAE
from ..pipelines.transformer_causal_wan import CausalWanTransformer3DModel
from . import runtime
from .folders import BUNDLED_DEMO, component_path, pipeline_folder, resolve_model


def wan21_latent_stats() -> tuple[list[float], list[float]]:
    """Wan2.1's per-channel latent mean/std: the defaults of diffusers' ``AutoencoderKLWan`` config."""
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return list(params["latents_mean"].default), list(params["latents_std"].default)


@dataclass
class OneForcingModel:
    """What flows on an ``ONEFORCING_MODEL`` socket.

    ``pipeline`` is the model's :class:`OneForcingPipeline` without text encoder and VAE (ComfyUI's nodes bring
    those): its transformer (``patcher.model.transformer``, moved by ComfyUI's model management), its scheduler (the
    default one-step schedule for single files) and what its folder recorded (video size, prompt length).
    ``latents_mean``/``latents_std`` are the statistics of the VAE the model was trained with (its pipeline's
    ``vae/config.json``, else Wan2.1's): the rollout uses them to hand out raw VAE-space LATENTs.
    ``trained_frames_per_block``: what the model's config records (None for single files, which record nothing).
    ``loras``: the LoRA files (and strengths) this model runs with, in the order the LoRA nodes added them; models
    that differ only here share the loaded weights, and the rollout puts exactly these adapters on the transformer
    (``pipelines.lora.apply_lora_stack``). Nodes never change a model they are given: they return a new one.
    """

    patcher: object
    pipeline: OneForcingPipeline
    latents_mean: list[float]
    latents_std: list[float]
    source: str
    trained_frames_per_block: int | None = None
    loras: tuple[LoraChoice, ...] = ()

    @property
    def transformer(self) -> CausalWanTransformer3DModel:
        return self.patcher.model.transformer

    @property
    def frames_per_block(self) -> int:
        """Latent frames per block when the rollout is not told otherwise: the transformer's config."""
        return int(self.transformer.config.frames_per_block)


def _model_index(folder: Path | None) -> dict:
    """What the model's pipeline folder records in ``model_index.json`` (empty for single files)."""
    if folder is not None and (folder / "model_index.json").is_file():
        return json.loads((folder / "model_index.json").read_text())
    return {}


def _latent_stats_of(folder: Path | None) -> tuple[list[float], list[float]]:
    if folder is not None and (folder / "vae" / "config.json").is_file():
        config = json.loads((folder / "vae" / "config.json").read_text())
        if config.get("latents_mean") and config.get("latents_std"):
            return list(config["latents_mean"]), list(config["latents_std"])
    return wan21_latent_stats()


def _scheduler_of(folder: Path | None) -> OneForcingScheduler:
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        return OneForcingScheduler.from_pretrained(folder / "scheduler")
    return OneForcingScheduler()


def load_transformer(model_name: str, dtype: str = "default", attention_backend: str = "auto",
                     num_attention_heads: int = 0) -> OneForcingModel:
    """The causal transformer from the ``diffusion_models`` folder.

    Args:
        model_name: a choice of ``list_models("diffusion_models")``: a One-Forcing/Self-Forcing ``.pt``, a ComfyUI or
            original single ``.safetensors`` file, a diffusers ``transformer/`` folder, or a pipeline folder.
        dtype: one of ``pipelines.presets.DTYPE_CHOICES`` (``"fp8_e4m3fn"``: fp8 weight storage).
        attention_backend: see ``pipelines.attention.ATTENTION_BACKENDS``.
        num_attention_heads: 0 reads the head count from the file; a count for single files that record none.
    """
    path = resolve_model("diffusion_models", model_name)
    component = component_path("diffusion_models", path)
    transformer = load_causal_transformer(component, resolve_dtype(dtype, runtime.default_device()),
                                          num_attention_heads or None, storage_dtype(dtype))
    transformer.set_attention_backend(attention_backend)
    transformer.eval().requires_grad_(False)
    folder = pipeline_folder("diffusion_models", path)
    recorded = _model_index(folder)
    mean, std = _latent_stats_of(folder)
    pipeline = OneForcingPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=_scheduler_of(folder),
        default_video_size=recorded.get("default_video_size"), max_sequence_length=recorded.get("max_sequence_length"),
    )
    pipeline.set_progress_bar_config(disable=True)  # ComfyUI shows its own progress bar
    patcher = runtime.manage(runtime.ModelHolder(transformer=transformer), "diffusion_model")
    trained = int(transformer.config.frames_per_block) if component.is_dir() else None
    return OneForcingModel(patcher, pipeline, mean, std, model_name, trained)


def add_lora(model: OneForcingModel, lora_name: str, strength: float = 1.0) -> OneForcingModel:
    """``model`` with the LoRA file ``lora_name`` (a choice of ``list_models("loras")``) at ``strength`` added to its
    ``loras``: a new model sharing the loaded weights; ``model`` itself is left as it is. The file is read and checked
    against the transformer now (missing, corrupt or made for another model: an error naming it); the rollout loads
    it."""
    if not isinstance(model, OneForcingModel):
        raise TypeError(f"model must come from One-Forcing Model Loader, got {type(model).__name__}")
    choice = choose_lora_file(model.pipeline, resolve_model("loras", lora_name), strength)
    return replace(model, loras=model.loras + (choice,))


# -- text encoder --------------------------------------------------------------------------------------------------
class SentencePieceTokenizer:
    """UMT5 tokenization straight from a SentencePiece model (what a ComfyUI ``umt5_xxl`` file embeds as
    ``spiece_model``): pieces, then ``</s>`` (id 1), padded with ``<pad>`` (id 0). Called like a transformers
    tokenizer by ``OneForcingPipeline.encode_prompt``."""

    def __init__(self, model_proto: bytes, eos_id: int = 1, pad_id: int = 0):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id, self.pad_id = eos_id, pad_id

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def __call__(self, texts, *, max_length: int, padding="max_length", truncation=True, add_special_tokens=True,
                 return_attention_mask=True, return_tensors="pt"):
        from transformers import BatchEncoding

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            pieces = self.sp.encode(text)[: max_length - 1] + [self.eos_id]
            ids[row, : len(pieces)] = torch.tensor(pieces)
            mask[row, : len(pieces)] = 1
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


def _embedded_spiece_model(path: Path) -> bytes | None:
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = [k for k in handle.keys() if k == "spiece_model" or k.endswith(".spiece_model")]
        if not names:
            return None
        return handle.get_tensor(names[0]).to(torch.uint8).numpy().tobytes()


def _tokenizer_for(path: Path):
    """A tokenizer for the text encoder at ``path``: from a pipeline's ``tokenizer/`` folder, tokenizer files in a
    transformers folder, a ``spiece_model`` embedded in a ComfyUI single file, or a ``tokenizer/`` folder (or a
    ``<file stem>.tokenizer/`` folder) next to the file."""
    from transformers import AutoTokenizer

    folder = pipeline_folder("text_encoders", path)
    candidates = []
    if folder is not None:
        candidates.append(folder / "tokenizer")
    if path.is_dir():
        candidates.append(path)
    else:
        embedded = _embedded_spiece_model(path)
        if embedded is not None:
            return SentencePieceTokenizer(embedded)
        candidates += [path.with_name(path.name.split(".")[0] + ".tokenizer"), path.parent / "tokenizer"]
    for candidate in candidates:
        if candidate.is_dir() and any((candidate / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            return AutoTokenizer.from_pretrained(candidate)
    raise CheckpointError(
        path,
        "no tokenizer found: expected a spiece_model tensor in the file (ComfyUI's umt5_xxl files have one), "
        f"or tokenizer files in one of {', '.join(str(c) for c in candidates)}",
    )


def load_text_encoder(text_encoder_name: str, dtype: str = "default"):
    """(tokenizer, managed UMT5 encoder) from the ``text_encoders`` folder.

    Accepts ComfyUI's single ``umt5_xxl_*.safetensors`` (fp8 included), the original Wan ``.pth``, a transformers
    folder, or a pipeline folder (its ``text_encoder/`` and ``tokenizer/``).
    """
    path = resolve_model("text_encoders", text_encoder_name)
    torch_dtype = resolve_dtype(dtype, runtime.default_device())
    component = component_path("text_encoders", path)
    tokenizer = _tokenizer_for(path if pipeline_folder("text_encoders", path) else component)
    encoder = load_umt5_encoder_single_file(component, dtype=torch_dtype, storage_dtype=storage_dtype(dtype))
    encoder.requires_grad_(False)
    return tokenizer, runtime.manage(runtime.ModelHolder(text_encoder=encoder), "text_encoder")


# -- VAE -----------------------------------------------------------------------------------------------------------
def load_vae(vae_name: str):
    """A managed ``AutoencoderKLWan`` (float32) from the ``vae`` folder: ComfyUI's ``wan_2.1_vae.safetensors``, the
    original ``Wan2.1_VAE.pth``, a diffusers ``vae/`` folder, or a pipeline folder."""
    path = resolve_model("vae", vae_name)
    vae = load_wan_vae_single_file(component_path("vae", path)).requires_grad_(False)
    return runtime.manage(runtime.ModelHolder(vae=vae), "vae")


def vae_from_comfy(comfy_vae):
    """ComfyUI's ``VAE`` object (from its ``VAELoader``) as a managed diffusers ``AutoencoderKLWan``, same weights.

    Only a Wan2.1 VAE (16 latent channels) fits; anything else is refused with the reason.
    """
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = getattr(comfy_vae, "first_stage_model", None)
    if model is None or not hasattr(model, "state_dict"):
        raise TypeError(f"vae must be ComfyUI's VAE object, got {type(comfy_vae).__name__}")
    source = f"ComfyUI VAE ({type(model).__name__})"
    state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}
    if "decoder.conv1.weight" not in state or "decoder.middle.0.residual.0.gamma" not in state:
        raise CheckpointError(source, "is not a Wan2.1 VAE (no decoder.conv1 / decoder.middle weights)")
    state = convert_wan_vae_to_diffusers(state)
    z_dim = int(state["post_quant_conv.weight"].shape[0])
    if z_dim != 16:
        raise CheckpointError(source, f"has {z_dim} latent channels; only the Wan2.1 VAE (16) is supported")
    with torch.device("meta"):
        vae = AutoencoderKLWan(**infer_wan_vae_config(state, source))
    check_state_dict_matches(vae, state, source)
    vae.load_state_dict(state, strict=True, assign=True)
    return runtime.manage(runtime.ModelHolder(vae=vae.eval().requires_grad_(False)), "vae")


# -- tiny preview VAE ----------------------------------------------------------------------------------------------
def load_tiny_vae(tiny_vae_name: str):
    """A managed :class:`TinyWanVAE` (float32) from the ``vae_approx`` folder: ``taew2_1.safetensors`` / ``.pth`` or a
    file in the same layout. A file that is not one gives a ``CheckpointError`` naming it."""
    path = resolve_model("vae_approx", tiny_vae_name)
    try:
        tiny = TinyWanVAE.from_single_file(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(path, f"cannot load the tiny VAE: {err}") from err
    return runtime.manage(runtime.ModelHolder(tiny_vae=tiny.requires_grad_(False)), "vae")


def wan_vae_latent_stats(vae_name: str, vae=None) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the Wan VAE space a LATENT is in, read without loading any VAE weights.

    A tiny VAE decodes the *normalised* latents ``(z - mean) / std`` of the Wan VAE it was trained against, so raw
    LATENTs are normalised with that VAE's statistics: those in ``vae_name``'s ``config.json`` (a diffusers ``vae/``
    folder, a pipeline folder, the bundled demo), else Wan2.1's (diffusers' ``AutoencoderKLWan`` defaults), which is
    what single files (ComfyUI's ``wan_2.1_vae.safetensors``), a connected ComfyUI VAE (ComfyUI's Wan2.1 latent format
    holds the same constants) and a bundled demo that is not installed give.
    """
    if vae is not None:
        channels = getattr(vae, "latent_channels", 16)
        if channels != 16:
            raise ValueError(f"the connected VAE has {channels} latent channels; the tiny VAE decodes Wan2.1 latents "
                             "(16): connect the Wan2.1 VAE or none")
        return wan21_latent_stats()
    try:
        path = resolve_model("vae", vae_name)
    except FileNotFoundError:
        if vae_name == BUNDLED_DEMO:  # nothing is read from it but its statistics
            return wan21_latent_stats()
        raise
    config_file = component_path("vae", path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("latents_mean") and config.get("latents_std"):
            return list(config["latents_mean"]), list(config["latents_std"])
    return wan21_latent_stats()
