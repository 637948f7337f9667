"""The steps every rollout is made of: a denoising forward of a block, the clean-context pass that commits a block to
the KV cache (alone, or fused with the next block's first denoising forward), and the re-cache of a prompt switch.

The inference session (:mod:`.session`) and the training rollout (``training/rollout.py``) are both loops over these.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Hashable

import torch

from .kv_cache import KVCache

_prompt_keys = itertools.count()


class PromptHandle:
    """Prompt embeddings [B, Ltext, text_dim] with an explicit identity.

    The KV cache keeps a prompt's cross-attention keys/values while the handle's ``key`` stays the same, so a handle
    is made once per prompt (not per forward) and the embeddings are never compared or hashed.
    """

    def __init__(self, embeds: torch.Tensor, key: Hashable | None = None):
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            raise ValueError(f"prompt embeddings must be a [B, L, D] tensor, got {tuple(getattr(embeds, 'shape', ()))}")
        self.embeds = embeds
        self.key = next(_prompt_keys) if key is None else key

    @classmethod
    def of(cls, prompt: "PromptHandle | torch.Tensor", dtype: torch.dtype) -> "PromptHandle":
        """A handle whose embeddings have ``dtype`` (the model's): ``prompt`` itself, or the same prompt cast."""
        if not isinstance(prompt, PromptHandle):
            prompt = cls(prompt)
        return prompt if prompt.embeds.dtype == dtype else cls(prompt.embeds.to(dtype), prompt.key)

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]


@dataclass
class RolloutBlock:
    """One generated block: ``latents`` [B, C, f, H, W] are its clean (normalised) latents, frames start_frame.."""

    index: int
    start_frame: int
    latents: torch.Tensor
    timesteps: torch.Tensor


def _model_dtype(transformer) -> torch.dtype:
    return transformer.proj_out.weight.dtype


def denoise_forward(transformer, x: torch.Tensor, t: float, prompt: PromptHandle, kv_cache: KVCache,
                    start_frame: int) -> torch.Tensor:
    """The flow [B, C, f, H, W] of block ``x`` (frames start_frame..) at timestep ``t``, attending to the cache."""
    t_frames = torch.full((x.shape[0], x.shape[2]), t, device=x.device, dtype=torch.float32)
    return transformer(x.to(_model_dtype(transformer)), t_frames, prompt.embeds, kv_cache=kv_cache,
                       start_frame=start_frame, prompt_key=prompt.key).sample


def commit_and_denoise_forward(transformer, done: RolloutBlock, x: torch.Tensor, t: float, prompt: PromptHandle,
                               kv_cache: KVCache, context_timestep: float = 0.0) -> torch.Tensor:
    """The fused step: commit block ``done`` and take block ``x``'s (the next block's) denoising forward at ``t`` in
    one forward (same result as the two apart, larger matrix products). Returns the flow of ``x``."""
    batch, committed = x.shape[0], done.latents.shape[2]
    t_clean = torch.full((batch, committed), context_timestep, device=x.device)
    t_frames = torch.full((batch, x.shape[2]), t, device=x.device, dtype=torch.float32)
    flow = transformer(
        torch.cat([done.latents, x], dim=2).to(_model_dtype(transformer)), torch.cat([t_clean, t_frames], dim=1),
        prompt.embeds, kv_cache=kv_cache, start_frame=done.start_frame, commit_frames=committed,
        prompt_key=prompt.key,
    ).sample[:, :, committed:]
    kv_cache.store_latents(done.start_frame, done.latents.detach())
    return flow


def commit_forward(transformer, kv_cache: KVCache, latents: torch.Tensor, prompt: PromptHandle, start_frame: int,
                   context_timestep: float = 0.0) -> None:
    """One clean-context pass: commit ``latents`` [B, C, f, H, W] as frames start_frame.. and remember them."""
    batch, _, frames = latents.shape[:3]
    t_clean = torch.full((batch, frames), context_timestep, device=latents.device)
    transformer(latents.to(_model_dtype(transformer)), t_clean, prompt.embeds, kv_cache=kv_cache,
                start_frame=start_frame, commit=True, prompt_key=prompt.key)
    kv_cache.store_latents(start_frame, latents.detach())  # values only: a training block's output has history


@torch.no_grad()
def commit_context(
    transformer,
    kv_cache: KVCache,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor | PromptHandle,
    *,
    frames_per_block: int | None = None,
    context_timestep: float = 0.0,
) -> None:
    """Write given clean latents into the cache as context (image-to-video, video extension).

    Args:
        latents: [B, C, f, H, W] normalised clean latents, committed as the next ``f`` frames of the video in the
            blocks of the transformer's layout (``frames_per_block`` overrides its block size), at
            ``context_timestep`` (0 = clean).
        prompt_embeds: [B, Ltext, text_dim] or a :class:`PromptHandle`.
    """
    if latents.ndim != 5 or latents.shape[2] < 1:
        raise ValueError(f"context latents must be [B, C, f >= 1, H, W], got {tuple(latents.shape)}")
    prompt = PromptHandle.of(prompt_embeds, _model_dtype(transformer))
    offset, first = 0, kv_cache.committed_frames
    for size in transformer.block_layout(frames_per_block).split(first, latents.shape[2]):
        commit_forward(transformer, kv_cache, latents[:, :, offset : offset + size], prompt, first + offset,
                       context_timestep)
        offset += size


@torch.no_grad()
def recache(
    transformer,
    kv_cache: KVCache,
    prompt_embeds: torch.Tensor | PromptHandle,
    *,
    keep_sink: bool = False,
    context_timestep: float = 0.0,
) -> None:
    """KV re-cache at a prompt switch: recompute the keys/values of the frames in the cache under new prompt embeddings.

    The clean latents the cache keeps for its frames are committed again, in the groups (blocks) they were committed
    in, at their original positions; the cross-attention keys/values are replaced by the new prompt's. Frames already
    evicted from a rolling cache are not part of it any more, so the window's frames see only the cache's frames.

    Args:
        prompt_embeds: [B, Ltext, text_dim] of the new prompt, or its :class:`PromptHandle`.
        keep_sink: leave a rolling cache's sink frames as they are (committed under the old prompt).
        context_timestep: timestep of the clean-context pass (as in the rollout).
    """
    groups = kv_cache.recache_groups(keep_sink)
    latents = [kv_cache.stored_latents(slot, count).clone() for _, slot, count in groups]  # all found before any write
    prompt = PromptHandle.of(prompt_embeds, _model_dtype(transformer))
    saved = (kv_cache.committed_frames, kv_cache.cached_frames)
    kv_cache.reset_cross_attention()
    try:
        for (frame, slot, _), group in zip(groups, latents):
            kv_cache.rewind(frame, slot)
            commit_forward(transformer, kv_cache, group, prompt, frame, context_timestep)
    finally:
        kv_cache.committed_frames, kv_cache.cached_frames = saved
