"""ComfyUI's LATENT holds raw Wan VAE latents; this package's rollout and decoder work in the VAE's normalised space,
``(z - mean) / std`` per channel (``pipelines/vae_streaming.py`` owns that map). These helpers apply it with the
statistics given as lists of 16 floats, always in float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..pipelines.vae_streaming import denormalize_with, latent_stats, normalize_with


def to_raw(latents: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised [B, C, F, H, W] -> raw VAE space ``latents * std + mean`` (float32)."""
    return denormalize_with(latents.float(), mean, std)


def to_normalised(samples: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Raw VAE-space [B, C, F, H, W] -> normalised ``(z - mean) / std`` (float32)."""
    return normalize_with(samples.float(), mean, std)


def normaliser(mean: Sequence[float], std: Sequence[float], device) -> Callable:
    """A map of raw blocks [B, C, f, H, W] to normalised float32 latents on ``device``, the statistics moved there
    once rather than with every block (each move would be a sync point)."""
    stats = latent_stats(mean, std, device)
    return lambda block: normalize_with(block.to(device).float(), *stats)


def latent_samples(latent, name: str = "latent") -> torch.Tensor:
    """The ``samples`` tensor of a ComfyUI LATENT dict, checked to be Wan's [B, 16, F, H/8, W/8]."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise TypeError(f"{name} must be a ComfyUI LATENT (a dict with 'samples'), got {type(latent).__name__}")
    samples = latent["samples"]
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{name} must hold video latents [B, 16, F, H/8, W/8] (Wan2.1), got {shape}")
    if samples.shape[1] != 16:
        raise ValueError(f"{name} has {samples.shape[1]} channels; Wan2.1 video latents have 16")
    if samples.shape[2] == 0:
        raise ValueError(f"{name} holds no frame: shape {tuple(samples.shape)}")
    return samples
