"""Decoding a LATENT to an IMAGE batch with the streaming Wan VAE decoder (``pipelines/vae_streaming.py``)."""

from __future__ import annotations

from typing import Callable

import torch

from ..pipelines.vae_streaming import WanStreamingDecoder, normalize_latents
from . import runtime
from .latents import latent_samples
from .model_loading import load_vae, vae_from_comfy


def decode_video(
    samples,
    vae_name: str,
    vae=None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """LATENT ``{"samples": [B, 16, F, h, w]}`` (raw VAE space) -> IMAGE [B * T, 8h, 8w, 3] float32 in 0..1.

    T = 1 + 4 (F - 1) frames per video; the videos of a batch follow each other. The VAE is ``vae`` (ComfyUI's VAE
    object, e.g. from ``VAELoader``) when connected, else ``vae_name`` from the ``vae`` folder. Decoding goes one latent
    frame at a time through the causal decoder cache, so GPU memory stays flat in the video length; each decoded piece
    moves to the CPU at once.
    """
    raw = latent_samples(samples, "samples")
    patcher = vae_from_comfy(vae) if vae is not None else load_vae(vae_name)
    device = runtime.load(patcher)
    model = patcher.model.vae
    num_frames = raw.shape[2]
    decoder = WanStreamingDecoder(model)
    progress = runtime.Progress(num_frames, on_progress)
    pieces = []
    try:
        with torch.no_grad():
            for index in range(num_frames):
                runtime.check_interrupted(should_stop)
                latents = normalize_latents(raw[:, :, index : index + 1].to(device, torch.float32), model)
                video = decoder.decode_block(latents)  # [B, 3, t, H, W] in [-1, 1]
                pieces.append(((video.float() + 1.0) / 2.0).clamp_(0.0, 1.0).to(runtime.intermediate_device()))
                progress.update(index + 1)
    finally:
        del decoder
        runtime.free_cache()
    video = torch.cat(pieces, dim=2)  # [B, 3, T, H, W]
    return video.permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[3:], 3).contiguous()
