"""The self-forcing training rollout: the inference steps (``pipelines/block_steps.py``) with gradient gating.

Every block stops after denoising step ``exit_step`` (clamped to its last step) and its output is that step's x0.
Only that forward records autograd (if the caller enables grad); every other forward runs under ``no_grad``, and the
clean-context pass commits the detached output, so no gradient crosses blocks through the cache. ``exit_step = last
step`` gives the inference rollout's video.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch

from ..pipelines.block_steps import (
    PromptHandle,
    RolloutBlock,
    commit_and_denoise_forward,
    commit_forward,
    denoise_forward,
)
from ..pipelines.kv_cache import KVCache
from ..pipelines.scheduling_one_forcing import OneForcingScheduler
from ..pipelines.session import NoiseSource


def self_forcing_blocks(
    transformer,
    scheduler: OneForcingScheduler,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    exit_step: int,
    frames_per_block: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: KVCache | None = None,
    gradient_blocks: int | None = None,
) -> Iterator[RolloutBlock]:
    """Generate the video block by block for training.

    Args:
        noise: [B, C, F, H, W] initial noise; prompt_embeds: [B, Ltext, text_dim].
        exit_step: the denoising step every block stops after (0 = the first).
        generator: the fresh noise between denoising steps.
        kv_cache: a full cache that holds the video (default: a new one).
        gradient_blocks: only the last ``gradient_blocks`` blocks record autograd (None: all).
    """
    if exit_step < 0:
        raise ValueError(f"exit_step must be >= 0, got {exit_step}")
    if gradient_blocks is not None and gradient_blocks < 0:
        raise ValueError("gradient_blocks must be >= 0")
    batch, _, frames, height, width = noise.shape
    layout = transformer.block_layout(frames_per_block, frames)
    if kv_cache is None:
        kv_cache = transformer.new_kv_cache(batch, layout.cache_frames(), height, width, device=noise.device)
    prompt = PromptHandle.of(prompt_embeds, transformer.proj_out.weight.dtype)
    source = NoiseSource.from_latents(noise, 0, generator)
    grad_enabled = torch.is_grad_enabled()
    first_grad_block = 0 if gradient_blocks is None else layout.num_blocks - gradient_blocks
    pending: RolloutBlock | None = None  # denoised, its clean-context pass fused into the next block's first forward
    for block in layout.blocks():
        steps = scheduler.block_timesteps(block.index)
        steps = steps[: min(exit_step, len(steps) - 1) + 1]
        values = steps.tolist()
        x = source.initial(block, batch)
        for step, t in enumerate(values):
            records_grad = grad_enabled and step + 1 == len(values) and block.index >= first_grad_block
            if records_grad and pending is not None:  # the context pass stays out of a forward that records autograd
                with torch.no_grad():
                    commit_forward(transformer, kv_cache, pending.latents, prompt, pending.start_frame)
                pending = None
            with torch.set_grad_enabled(records_grad):
                if pending is not None:
                    flow = commit_and_denoise_forward(transformer, pending, x, t, prompt, kv_cache)
                    pending = None
                else:
                    cache = _gradient_view(kv_cache, block.size) if records_grad else kv_cache
                    flow = denoise_forward(transformer, x, t, prompt, cache, block.start)
                x0 = scheduler.x0_from_flow(x, flow.to(x.dtype), t)
            if step + 1 < len(values):
                x = scheduler.add_noise(x0, source.fresh(x0), values[step + 1])
        done = RolloutBlock(index=block.index, start_frame=block.start, latents=x0, timesteps=steps)
        following = layout.block_after(block)
        if following is not None and kv_cache.fits(block.size + following.size):
            pending = done
        elif following is not None:
            with torch.no_grad():
                commit_forward(transformer, kv_cache, done.latents, prompt, done.start_frame)
        yield done


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
