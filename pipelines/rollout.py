"""The autoregressive rollout: denoise a block of latent frames in a few steps, commit it to the KV cache, go on.

This is the one implementation of the sampling loop; the pipeline, the ComfyUI nodes and training all call it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from diffusers.utils.torch_utils import randn_tensor

from .kv_cache import KVCache
from .scheduling_one_forcing import OneForcingScheduler

NoiseSampler = Callable[[tuple, torch.dtype, torch.device], torch.Tensor]
"""Draws the fresh noise of a re-noising step: (shape [B, C, f, H, W], dtype, device) -> tensor."""


@dataclass
class RolloutBlock:
    """One generated block: ``latents`` [B, C, f, H, W] are its clean (normalised) latents, frames start_frame.."""

    index: int
    start_frame: int
    latents: torch.Tensor
    timesteps: torch.Tensor


def block_sizes(num_frames: int, frames_per_block: int) -> list[int]:
    """Split ``num_frames`` latent frames into blocks of ``frames_per_block`` (the last one may be shorter)."""
    if num_frames < 1:
        raise ValueError(f"need at least one latent frame, got {num_frames}")
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    full, rest = divmod(num_frames, frames_per_block)
    return [frames_per_block] * full + ([rest] if rest else [])


def generator_noise_sampler(generator: torch.Generator | list[torch.Generator] | None) -> NoiseSampler:
    """Fresh Gaussian noise from the caller's generator (reproducible for a seed)."""

    def sample(shape, dtype, device):
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    return sample


def causal_rollout(
    transformer,
    scheduler: OneForcingScheduler,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    frames_per_block: int | None = None,
    denoising_timesteps=None,
    first_block_timesteps=None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise_sampler: NoiseSampler | None = None,
    kv_cache: KVCache | None = None,
    context_timestep: float = 0.0,
    commit_last_block: bool = False,
    fuse_context_pass: bool = True,
    on_block_denoised: Callable[[RolloutBlock], torch.Tensor | None] | None = None,
    exit_step: int | None = None,
    gradient_blocks: int | None = None,
) -> Iterator[RolloutBlock]:
    """Generate the video block by block.

    Args:
        noise: [B, C, F, H, W] initial noise of the frames to generate (float32 recommended).
        prompt_embeds: [B, Ltext, text_dim], passed unchanged to every forward (its cross-attention is cached once).
        frames_per_block: latent frames per block (default: the transformer's config).
        denoising_timesteps / first_block_timesteps: override the scheduler's lists (given un-warped).
        generator / noise_sampler: source of the fresh noise between denoising steps.
        kv_cache: a cache to continue (e.g. holding a committed start image); blocks then start at its
            ``committed_frames``. By default a new cache sized for ``noise`` is made.
        context_timestep: timestep of the clean-context pass (0 = clean).
        commit_last_block: also commit the final block (needed only to continue the video afterwards).
        fuse_context_pass: run each block's clean-context pass together with the next block's first denoising step
            in one forward (same result, half the forwards of a one-step rollout, larger matrix products). The block
            is then yielded before its keys/values are committed.
        on_block_denoised: called with each block before it is committed; may return replacement latents.
        exit_step: self-forcing training. Every block stops after denoising step ``exit_step`` (clamped to its last
            step) and its output is that step's x0. Only that forward records autograd (if the caller enables grad);
            every other forward runs under ``no_grad``, and the clean-context pass commits the detached output, so
            no gradient crosses blocks through the cache. ``exit_step = last step`` gives the inference rollout.
        gradient_blocks: with ``exit_step``, only the last ``gradient_blocks`` blocks record autograd (None: all).
    Yields:
        :class:`RolloutBlock` per block, after its clean-context pass.
    """
    if noise.ndim != 5:
        raise ValueError(f"noise must be [B, C, F, H, W], got {tuple(noise.shape)}")
    batch, _, num_frames, height, width = noise.shape
    if prompt_embeds.shape[0] != batch:
        raise ValueError(f"prompt_embeds batch {prompt_embeds.shape[0]} != latent batch {batch}")
    if exit_step is not None and exit_step < 0:
        raise ValueError(f"exit_step must be >= 0, got {exit_step}")
    if gradient_blocks is not None and (exit_step is None or gradient_blocks < 0):
        raise ValueError("gradient_blocks needs exit_step and must be >= 0")
    frames_per_block = frames_per_block or transformer.config.frames_per_block
    model_dtype = transformer.proj_out.weight.dtype
    if kv_cache is None:
        kv_cache = transformer.new_kv_cache(batch, num_frames, height, width, device=noise.device)
        kv_cache.reset()
    first_frame = kv_cache.committed_frames
    sample_noise = noise_sampler or generator_noise_sampler(generator)
    prompt_embeds = prompt_embeds.to(model_dtype)

    training = exit_step is not None

    def commit(block: RolloutBlock) -> None:
        t_clean = torch.full((batch, block.latents.shape[2]), context_timestep, device=noise.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not training):
            transformer(
                block.latents.to(model_dtype), t_clean, prompt_embeds, kv_cache=kv_cache,
                start_frame=block.start_frame, commit=True,
            )

    sizes = block_sizes(num_frames, frames_per_block)
    grad_enabled = torch.is_grad_enabled()
    first_grad_block = 0 if gradient_blocks is None else len(sizes) - gradient_blocks
    pending: RolloutBlock | None = None  # denoised, waiting for its clean-context pass
    offset = 0
    for index, size in enumerate(sizes):
        start = first_frame + offset
        timesteps = scheduler.block_timesteps(index, denoising_timesteps, first_block_timesteps)
        if training:
            timesteps = timesteps[: min(exit_step, len(timesteps) - 1) + 1]
        x = noise[:, :, offset : offset + size]
        for step, t in enumerate(timesteps.tolist()):
            t_frames = torch.full((batch, size), t, device=noise.device, dtype=torch.float32)
            records_grad = training and grad_enabled and step + 1 == len(timesteps) and index >= first_grad_block
            if records_grad and pending is not None:  # the context pass stays out of a forward that records autograd
                commit(pending)
                pending = None
            with torch.set_grad_enabled(records_grad or (grad_enabled and not training)):
                if pending is not None:  # fused: commit the previous block and take this block's first step at once
                    done = pending.latents.shape[2]
                    t_clean = torch.full((batch, done), context_timestep, device=noise.device)
                    flow = transformer(
                        torch.cat([pending.latents, x], dim=2).to(model_dtype), torch.cat([t_clean, t_frames], dim=1),
                        prompt_embeds, kv_cache=kv_cache, start_frame=pending.start_frame, commit_frames=done,
                    ).sample[:, :, done:]
                    pending = None
                else:
                    flow = transformer(
                        x.to(model_dtype), t_frames, prompt_embeds, start_frame=start,
                        kv_cache=_gradient_view(kv_cache, size) if records_grad else kv_cache,
                    ).sample
                x0 = scheduler.x0_from_flow(x, flow.to(x.dtype), t)
            if step + 1 < len(timesteps):
                fresh = sample_noise(tuple(x0.shape), torch.float32, x0.device).to(x0.dtype)
                x = scheduler.add_noise(x0, fresh, timesteps[step + 1].item())
        block = RolloutBlock(index=index, start_frame=start, latents=x0, timesteps=timesteps)
        if on_block_denoised is not None:
            replaced = on_block_denoised(block)
            if replaced is not None:
                block.latents = replaced
        is_last = index + 1 == len(sizes)
        next_size = sizes[index + 1] if not is_last else 0
        # a rolling cache that must evict for the next block would evict before this block's clean pass: keep it apart
        if fuse_context_pass and not is_last and kv_cache.fits(size + next_size):
            pending = block
        elif not is_last or commit_last_block:
            commit(block)
        yield block
        offset += size


def _gradient_view(kv_cache: KVCache, num_frames: int) -> KVCache:
    """The cache as seen by one forward that records autograd.

    It shares the committed key/value buffers, which such a forward only reads (the cache concatenates
    gradient-carrying keys instead of writing them), but keeps its own slot position and cross-attention entries:
    gradient checkpointing recomputes the forward during backward, after the rollout has moved on, and must find the
    cache as the forward found it; and the prompt's cross-attention keys/values are recomputed with autograd rather
    than reused from a no-grad pass, so the text projections get the gradient of every block.
    """
    if not kv_cache.fits(num_frames):
        raise ValueError("a training rollout (exit_step) needs a KV cache that holds the video without eviction")
    view = copy.copy(kv_cache)
    view.reset_cross_attention()
    return view
