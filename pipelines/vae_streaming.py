"""Streaming decode (and encode) with diffusers' ``AutoencoderKLWan``.

The Wan VAE decoder is causal in time: ``AutoencoderKLWan._decode`` feeds it one latent frame at a time while every
causal 3-D convolution keeps its last input frames in a feature cache. Keeping that cache alive between blocks makes
block-by-block decoding equal to one full decode; calling ``vae.decode`` (which clears the cache) mid-stream would not.
The first latent frame of a video decodes to 1 video frame, every later one to 4.

Latents in this package are *normalised*: ``(z - latents_mean) / latents_std`` per channel.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan


def _stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
    return mean, std


def normalize_latents(z: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Raw VAE latents [B, C, F, H, W] -> normalised latents (same dtype)."""
    mean, std = _stats(vae, z)
    return ((z.float() - mean) / std).to(z.dtype)


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Normalised latents [B, C, F, H, W] -> raw VAE latents (same dtype)."""
    mean, std = _stats(vae, latents)
    return (latents.float() * std + mean).to(latents.dtype)


def _check_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> None:
    if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
        raise ValueError(f"latents must be [B, {vae.config.z_dim}, F, H, W], got {tuple(latents.shape)}")


class WanStreamingDecoder:
    """Decodes a video block by block, keeping the VAE's causal-convolution cache between blocks.

    ``decode_block`` of consecutive blocks, concatenated in time, equals ``vae.decode`` of all their latents.
    """

    def __init__(self, vae: AutoencoderKLWan):
        if vae.config.patch_size is not None:
            raise ValueError("streaming decode supports the Wan2.1 VAE (no patchified Wan2.2 VAE)")
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self._feat_cache: list = [None] * self.vae._cached_conv_counts["decoder"]
        self.latent_frames_decoded = 0
        self.frames_decoded = 0

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, f, h, w] -> video [B, 3, T, 8h, 8w] in [-1, 1].

        T = 1 + 4 (f - 1) for the stream's first block, 4 f afterwards.
        """
        _check_latents(latents, self.vae)
        vae = self.vae
        z = denormalize_latents(latents, vae).to(vae.dtype)
        x = vae.post_quant_conv(z)
        frames = []
        for i in range(x.shape[2]):
            first = self.latent_frames_decoded == 0
            frames.append(
                vae.decoder(x[:, :, i : i + 1], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first)
            )
            self.latent_frames_decoded += 1
        video = torch.cat(frames, dim=2).clamp(-1.0, 1.0)
        self.frames_decoded += video.shape[2]
        return video

    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole video at once (a fresh stream of one block)."""
        self.reset()
        return self.decode_block(latents)


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, T, H, W] in [-1, 1] with T = 1 + 4k -> normalised latents [B, C, 1 + k, H/8, W/8] (posterior mode)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
    if (video.shape[2] - 1) % vae.config.scale_factor_temporal:
        raise ValueError(f"video frames must be 1 + {vae.config.scale_factor_temporal}k, got {video.shape[2]}")
    z = vae.encode(video.to(vae.dtype)).latent_dist.mode()
    return normalize_latents(z, vae)
