"""Text encoding and the autoregressive rollout, as plain functions the nodes call.

The sampling loop itself is ``pipelines.rollout.causal_rollout``; this module only prepares its inputs the way
``OneForcingPipeline`` does (same noise for the same seed), reports progress, honours cancellation between blocks and
converts the result to a ComfyUI LATENT (raw VAE space).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..pipelines.pipeline_one_forcing import OneForcingPipeline
from ..pipelines.rollout import block_sizes, causal_rollout
from . import runtime
from .latents import latent_samples, to_raw
from .model_loading import OneForcingModel, load_text_encoder

TIMESTEP_PRESETS = {
    # name -> (denoising_timesteps of every block, first_block_timesteps or None); un-warped, as the scheduler takes
    "one step": ([1000], None),
    "first block four steps": ([1000], [1000, 750, 500, 250]),
    "four steps": ([1000, 750, 500, 250], None),
}
MAX_SEQUENCE_LENGTH = 512
VAE_TEMPORAL, VAE_SPATIAL = 4, 8


def encode_text(text_encoder_name: str, prompt: str, dtype: str = "default") -> list:
    """A ComfyUI CONDITIONING ``[[embeds [1, 512, dim] float32, {}]]`` of ``prompt``, encoded as the pipeline does
    (UMT5, 512 tokens, zero beyond the prompt's tokens)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    tokenizer, patcher = load_text_encoder(text_encoder_name, dtype)
    device = runtime.load(patcher)
    encoder = OneForcingPipeline(
        tokenizer=tokenizer, text_encoder=patcher.model.text_encoder, transformer=None, vae=None, scheduler=None
    )
    with torch.no_grad():
        embeds = encoder.encode_prompt(prompt, max_sequence_length=MAX_SEQUENCE_LENGTH, device=device,
                                       dtype=torch.float32)
    return [[embeds.to(runtime.intermediate_device()), {}]]


def conditioning_embeds(conditioning, text_dim: int) -> torch.Tensor:
    """The prompt embeddings [B, L, text_dim] of a CONDITIONING (this package's, or ComfyUI's ``CLIPTextEncode``
    with a ``wan`` CLIP)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise TypeError("conditioning must be a non-empty ComfyUI CONDITIONING list of [tensor, dict] pairs")
    if len(conditioning) != 1:
        raise ValueError(
            f"conditioning holds {len(conditioning)} entries; the rollout takes one prompt (no combine/area/timestep "
            "ranges)"
        )
    entry = conditioning[0]
    embeds = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError("conditioning entries must be [tensor [B, L, dim], dict] pairs")
    if embeds.shape[-1] != text_dim:
        raise ValueError(
            f"conditioning has width {embeds.shape[-1]}, the model's text encoder width is {text_dim} "
            "(Wan2.1 models take UMT5-XXL embeddings: use a 'wan' CLIP or this package's text encoder)"
        )
    return embeds


def fit_text_length(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """Prompt embeddings [B, L, D] cut or zero-padded to the ``length`` tokens the model was trained with.

    The pipeline encodes prompts zero-padded to that length and the model attends to the padding rows too, so a
    CONDITIONING of another length (ComfyUI's Wan CLIP gives only the prompt's tokens, this package's encoder 512)
    must be brought to it for the model to see what it saw in training.
    """
    if embeds.shape[1] >= length:
        return embeds[:, :length]
    return torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1]))


def check_video_size(width: int, height: int, length: int, multiple: int) -> int:
    """Latent frames of a ``length``-frame video; clear errors for sizes the model cannot make."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be at least 1 video frame, got {length}")
    if (length - 1) % VAE_TEMPORAL:
        raise ValueError(f"length must be 1 + {VAE_TEMPORAL}k video frames (e.g. 81), got {length}")
    return (length - 1) // VAE_TEMPORAL + 1


def generate_latents(
    model: OneForcingModel,
    conditioning,
    seed: int,
    width: int,
    height: int,
    length: int,
    frames_per_block: int = 0,
    timesteps: str = "one step",
    initial_latent=None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Roll the video out block by block -> a ComfyUI LATENT ``{"samples": [B, 16, F, H/8, W/8]}`` in raw VAE space.

    Args:
        model: from the loader node.
        conditioning: one prompt's embeddings (see :func:`conditioning_embeds`).
        seed: the initial and re-noising noise (CPU generator: the same video on every device).
        width, height: pixels, multiples of 16; length: video frames, 1 + 4k.
        frames_per_block: latent frames per block; 0 = the loader's setting.
        timesteps: a :data:`TIMESTEP_PRESETS` name.
        initial_latent: a LATENT whose shape sets batch, frames and size instead of width/height/length (as from
            ComfyUI's ``EmptyHunyuanLatentVideo``; its values are not used: the noise comes from ``seed``).
        on_progress(done_blocks, total_blocks), should_stop(): hooks for callers outside ComfyUI.
    """
    transformer = model.transformer
    if timesteps not in TIMESTEP_PRESETS:
        raise ValueError(f"timesteps must be one of {', '.join(TIMESTEP_PRESETS)}, got {timesteps!r}")
    if frames_per_block < 0:
        raise ValueError(f"frames_per_block must be 0 (the model's setting) or positive, got {frames_per_block}")
    multiple = VAE_SPATIAL * transformer.config.patch_size[1]
    batch = 1
    if initial_latent is not None:
        shape = latent_samples(initial_latent, "initial_latent").shape
        batch = shape[0]
        width, height, length = shape[4] * VAE_SPATIAL, shape[3] * VAE_SPATIAL, (shape[2] - 1) * VAE_TEMPORAL + 1
    num_frames = check_video_size(width, height, length, multiple)
    embeds = conditioning_embeds(conditioning, transformer.config.text_dim)
    if embeds.shape[0] not in (1, batch):
        raise ValueError(f"conditioning batch {embeds.shape[0]} does not match the latent batch {batch}")
    frames_per_block = frames_per_block or model.frames_per_block
    denoising, first_block = TIMESTEP_PRESETS[timesteps]

    runtime.check_interrupted(should_stop)
    device = runtime.load(model.patcher)
    # ComfyUI runs nodes under torch.inference_mode(); the KV cache tracks its prompt through the tensor version
    # counter, which inference tensors lack: the rollout runs as plain no-grad code on plain tensors
    with torch.inference_mode(False), torch.no_grad():
        return _rollout(model, embeds, seed, batch, num_frames, height, width, frames_per_block, denoising,
                        first_block, device, on_progress, should_stop)


def _rollout(model, embeds, seed, batch, num_frames, height, width, frames_per_block, denoising, first_block, device,
             on_progress, should_stop) -> dict:
    transformer = model.transformer
    generator = torch.Generator("cpu").manual_seed(int(seed))
    shape = (batch, transformer.config.in_channels, num_frames, height // VAE_SPATIAL, width // VAE_SPATIAL)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    prompt_embeds = fit_text_length(embeds, model.text_length).to(device).expand(batch, -1, -1).clone()
    out = torch.zeros(shape, dtype=torch.float32, device=runtime.intermediate_device())
    sizes = block_sizes(num_frames, frames_per_block)
    progress = runtime.Progress(len(sizes), on_progress)
    preview = runtime.latent_previewer(device)
    rollout = causal_rollout(
        transformer, model.scheduler, noise, prompt_embeds, frames_per_block=frames_per_block,
        denoising_timesteps=denoising, first_block_timesteps=first_block, generator=generator,
    )
    start = 0
    try:
        for index in range(len(sizes)):
            runtime.check_interrupted(should_stop)  # cancel between blocks; the finally frees the cache
            block = next(rollout)
            out[:, :, start : start + sizes[index]] = block.latents.float().to(out.device)
            start += sizes[index]
            progress.update(index + 1, preview(block.latents) if preview is not None else None)
    finally:
        rollout.close()  # drops the generator's KV cache
        del rollout, noise
        runtime.free_cache()
    return {"samples": to_raw(out, model.latents_mean, model.latents_std)}
