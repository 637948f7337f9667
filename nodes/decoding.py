"""Decoding a LATENT to an IMAGE batch, streamed one latent frame at a time: with the Wan VAE
(``pipelines/vae_streaming.py``) or, for fast previews, a tiny TAEHV-architecture VAE (``pipelines/tiny_vae.py``)."""

from __future__ import annotations

from typing import Callable

import torch

from ..pipelines.tiny_vae import TinyWanStreamingDecoder
from ..pipelines.vae_streaming import WanStreamingDecoder
from . import runtime
from .folders import NO_TINY_VAE
from .latents import latent_samples, normaliser
from .model_loading import load_tiny_vae, load_vae, vae_from_comfy, wan_vae_latent_stats


def decode_video(
    samples,
    vae_name: str,
    vae=None,
    tiny_vae: str = NO_TINY_VAE,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """LATENT ``{"samples": [B, 16, F, h, w]}`` (raw VAE space) -> IMAGE [B * T, 8h, 8w, 3] float32 in 0..1.

    T = 1 + 4 (F - 1) frames per video; the videos of a batch follow each other. The VAE is ``vae`` (ComfyUI's VAE
    object, e.g. from ``VAELoader``) when connected, else ``vae_name`` from the ``vae`` folder. With ``tiny_vae`` (a
    file in ``vae_approx``, not :data:`NO_TINY_VAE`) that tiny VAE decodes instead, and the Wan VAE only lends the
    latent statistics (its config; no weights are loaded). Decoding goes one latent frame at a time through the
    decoder's causal cache, so GPU memory stays flat in the video length; each decoded piece moves to the CPU at once.
    """
    raw = latent_samples(samples, "samples")
    if tiny_vae != NO_TINY_VAE:
        # the LATENT is raw Wan VAE space; the tiny VAE takes the normalised latents the diffusion model works in
        mean, std = wan_vae_latent_stats(vae_name, vae)
        patcher = load_tiny_vae(tiny_vae)
        device = runtime.load(patcher)
        with runtime.cpu_threads(device):
            return _stream(raw, TinyWanStreamingDecoder(patcher.model.tiny_vae), normaliser(mean, std, device),
                           on_progress, should_stop)
    patcher = vae_from_comfy(vae) if vae is not None else load_vae(vae_name)
    device = runtime.load(patcher)
    model = patcher.model.vae
    normalise = normaliser(model.config.latents_mean, model.config.latents_std, device)
    with runtime.cpu_threads(device):
        return _stream(raw, WanStreamingDecoder(model), normalise, on_progress, should_stop)


def _stream(raw: torch.Tensor, decoder, normalise: Callable[[torch.Tensor], torch.Tensor], on_progress,
            should_stop) -> torch.Tensor:
    """Feed ``raw`` [B, 16, F, h, w] to ``decoder.decode_block`` one latent frame at a time (each normalised by
    ``normalise``) -> IMAGE [B * T, 8h, 8w, 3] in 0..1, with progress and cancel per latent frame. The caller keeps
    no reference to ``decoder``: its cache is freed here, before the device cache is emptied."""
    num_frames = raw.shape[2]
    progress = runtime.Progress(num_frames, on_progress)
    pieces = []
    try:
        with torch.no_grad():
            for index in range(num_frames):
                runtime.check_interrupted(should_stop)
                video = decoder.decode_block(normalise(raw[:, :, index : index + 1]))  # [B, 3, t, H, W] in [-1, 1]
                pieces.append(((video.float() + 1.0) / 2.0).clamp_(0.0, 1.0).to(runtime.intermediate_device()))
                progress.update(index + 1)
    finally:
        del decoder
        runtime.free_cache()
    video = torch.cat(pieces, dim=2)  # [B, 3, T, H, W]
    return video.permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[3:], 3).contiguous()
