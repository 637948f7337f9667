"""Encoding an IMAGE batch (a start image, or a clip to continue) to a LATENT with the Wan VAE.

The work is the library's ``encode_context`` (``pipelines/pipeline_one_forcing.py``: resize, scale to -1..1, VAE
encode); this module only turns ComfyUI's IMAGE into its input and its normalised latents into a ComfyUI LATENT (raw
VAE space), which the rollout node takes as context and ComfyUI's own ``VAEDecode`` (Wan VAE) can decode.
"""

from __future__ import annotations

import torch

from ..pipelines.layout import latent_frame_count
from ..pipelines.pipeline_one_forcing import encode_context
from . import runtime
from .latents import to_raw
from .model_loading import load_vae, vae_from_comfy

SIZE_MULTIPLE = 16
"""Pixels per side of a Wan2.1 patch (8 per latent pixel, 2 x 2 latent pixels per patch): the sizes the rollout makes
(the encoder has no transformer at hand to read its patch size from)."""


def check_images(images) -> torch.Tensor:
    """A ComfyUI IMAGE ``[T, H, W, C]`` (float 0..1) with T = 1 + 4k frames, as ``[T, 3, H, W]`` float32."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a ComfyUI IMAGE [frames, height, width, channels], got {shape}")
    try:
        latent_frame_count(images.shape[0], what="images")
    except ValueError as err:
        raise ValueError(f"{err} (one image, or a clip: e.g. cut with ImageFromBatch)") from None
    frames = images[..., :3].float()  # an alpha channel is dropped, as ComfyUI's VAEEncode does
    if frames.shape[-1] == 1:
        frames = frames.expand(*frames.shape[:-1], 3)
    return frames.permute(0, 3, 1, 2).contiguous()


def encode_images(images, vae_name: str, width: int, height: int, vae=None) -> dict:
    """IMAGE ``[T, H, W, C]`` (one image or a clip of 1 + 4k frames) -> LATENT ``{"samples": [1, 16, 1 + (T-1)/4,
    height/8, width/8]}`` in raw VAE space. Frames are resized to ``width`` x ``height``, multiples of
    :data:`SIZE_MULTIPLE` as the rollout needs (a Wan2.1 model's patches span 2 x 2 latent pixels)."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE} (what the rollout makes), "
                             f"got {value}")
    frames = check_images(images)
    patcher = vae_from_comfy(vae) if vae is not None else load_vae(vae_name)
    device = runtime.load(patcher)
    model = patcher.model.vae
    try:
        latents = encode_context(model, video=frames, size=(height, width), device=device)
    finally:
        runtime.free_cache()
    samples = to_raw(latents.to(runtime.intermediate_device()), model.config.latents_mean, model.config.latents_std)
    return {"samples": samples}
