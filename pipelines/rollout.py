"""The autoregressive rollout: denoise a block of latent frames in a few steps, commit it to the KV cache, go on.

This is the one implementation of the sampling loop; the pipeline, the ComfyUI nodes and training all call it.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from diffusers.utils.torch_utils import randn_tensor

from .checks import check_finite_inputs, check_first_block
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


def frames_to_cache(num_frames: int, frames_per_block: int, commit_last_block: bool = False) -> int:
    """Of ``num_frames`` generated latent frames, how many a full KV cache must hold: all but the last block, which no
    later block attends to (unless it is committed to continue the video afterwards)."""
    return num_frames - (0 if commit_last_block else block_sizes(num_frames, frames_per_block)[-1])


def generator_noise_sampler(generator: torch.Generator | list[torch.Generator] | None) -> NoiseSampler:
    """Fresh Gaussian noise from the caller's generator (reproducible for a seed)."""

    def sample(shape, dtype, device):
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    return sample


BlockNoise = Callable[[int, int], torch.Tensor]
"""Initial noise drawn block by block: (start_frame, num_frames) -> [B, C, num_frames, H, W]."""


def _commit_forward(transformer, kv_cache: KVCache, latents, prompt_embeds, start_frame: int, context_timestep: float):
    """One clean-context pass: commit ``latents`` [B, C, f, H, W] as frames start_frame.. and remember them."""
    batch, _, frames = latents.shape[:3]
    t_clean = torch.full((batch, frames), context_timestep, device=latents.device)
    model_dtype = transformer.proj_out.weight.dtype
    transformer(
        latents.to(model_dtype), t_clean, prompt_embeds, kv_cache=kv_cache, start_frame=start_frame, commit=True
    )
    kv_cache.store_latents(start_frame, latents)


@torch.no_grad()
def commit_context(
    transformer,
    kv_cache: KVCache,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    frames_per_block: int | None = None,
    context_timestep: float = 0.0,
) -> None:
    """Write given clean latents into the cache as context (image-to-video, video extension).

    Args:
        latents: [B, C, f, H, W] normalised clean latents, committed as the next ``f`` frames of the video in blocks
            of ``frames_per_block`` (default: the transformer's), at ``context_timestep`` (0 = clean).
        prompt_embeds: [B, Ltext, text_dim].
    """
    if latents.ndim != 5 or latents.shape[2] < 1:
        raise ValueError(f"context latents must be [B, C, f >= 1, H, W], got {tuple(latents.shape)}")
    embeds = prompt_embeds.to(transformer.proj_out.weight.dtype)
    offset, first = 0, kv_cache.committed_frames
    for size in block_sizes(latents.shape[2], frames_per_block or transformer.config.frames_per_block):
        _commit_forward(transformer, kv_cache, latents[:, :, offset : offset + size], embeds, first + offset,
                        context_timestep)
        offset += size


@torch.no_grad()
def recache(
    transformer,
    kv_cache: KVCache,
    prompt_embeds: torch.Tensor,
    *,
    keep_sink: bool = False,
    context_timestep: float = 0.0,
) -> None:
    """KV re-cache at a prompt switch: recompute the keys/values of the frames in the cache under new prompt embeddings.

    The clean latents the cache keeps for its frames are committed again, in the groups (blocks) they were committed
    in, at their original positions; the cross-attention keys/values are replaced by the new prompt's. Frames already
    evicted from a rolling cache are not part of it any more, so the window's frames see only the cache's frames.

    Args:
        prompt_embeds: [B, Ltext, text_dim] of the new prompt.
        keep_sink: leave a rolling cache's sink frames as they are (committed under the old prompt).
        context_timestep: timestep of the clean-context pass (as in the rollout).
    """
    groups = kv_cache.recache_groups(keep_sink)
    latents = [kv_cache.stored_latents(slot, count).clone() for _, slot, count in groups]  # all found before any write
    embeds = prompt_embeds.to(transformer.proj_out.weight.dtype)
    saved = (kv_cache.committed_frames, kv_cache.cached_frames)
    kv_cache.reset_cross_attention()
    try:
        for (frame, slot, _), group in zip(groups, latents):
            kv_cache.rewind(frame, slot)
            _commit_forward(transformer, kv_cache, group, embeds, frame, context_timestep)
    finally:
        kv_cache.committed_frames, kv_cache.cached_frames = saved


def _block_plan(num_frames: int | None, frames_per_block: int) -> Iterator[tuple[int, int, bool, int]]:
    """(index, size, is_last, next_size) of each block; endless when ``num_frames`` is None."""
    if num_frames is None:
        for index in itertools.count():
            yield index, frames_per_block, False, frames_per_block
        return
    sizes = block_sizes(num_frames, frames_per_block)
    for index, size in enumerate(sizes):
        is_last = index + 1 == len(sizes)
        yield index, size, is_last, 0 if is_last else sizes[index + 1]


def _check_switches(switches: Mapping[int, torch.Tensor], first: int, num_frames: int | None, per_block: int, batch):
    """Prompt switches must land on block starts of the frames to generate."""
    end = None if num_frames is None else first + num_frames
    for frame, embeds in switches.items():
        if frame < first:
            raise ValueError(
                f"prompt switch at latent frame {frame} falls inside the committed context (frames 0..{first - 1}); "
                f"switches apply from frame {first}, the first generated block"
            )
        if end is not None and frame >= end:
            raise ValueError(
                f"prompt switch at latent frame {frame} is past the end of the video ({end} latent frames)"
            )
        if (frame - first) % per_block:
            raise ValueError(
                f"prompt switch at latent frame {frame} is not a block start (blocks of {per_block} frames start at "
                f"{first}, {first + per_block}, ...)"
            )
        if embeds.ndim != 3 or embeds.shape[0] != batch:
            raise ValueError(f"prompt switch at latent frame {frame}: embeddings must be [{batch}, L, D], "
                             f"got {tuple(embeds.shape)}")


def causal_rollout(
    transformer,
    scheduler: OneForcingScheduler,
    noise: torch.Tensor | BlockNoise,
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
    num_frames: int | None = None,
    context_latents: torch.Tensor | None = None,
    prompt_switches: Mapping[int, torch.Tensor] | None = None,
    keep_sink_on_switch: bool = False,
) -> Iterator[RolloutBlock]:
    """Generate the video block by block.

    Args:
        noise: [B, C, F, H, W] initial noise of the frames to generate (float32 recommended), or a :data:`BlockNoise`
            callable drawing each block's noise when it is needed (then ``num_frames`` says how many frames to
            generate, None = without end, and ``kv_cache`` must be given; an endless rollout needs a rolling cache).
        prompt_embeds: [B, Ltext, text_dim], passed unchanged to every forward (its cross-attention is cached once).
        frames_per_block: latent frames per block (default: the transformer's config).
        denoising_timesteps / first_block_timesteps: override the scheduler's lists (given un-warped).
        generator / noise_sampler: source of the fresh noise between denoising steps.
        kv_cache: a cache to continue (e.g. holding a committed start image); blocks then start at its
            ``committed_frames``. By default a new cache sized for ``context_latents`` and ``noise`` is made (without
            slots for the last block unless ``commit_last_block``: a full cache only needs room for committed frames).
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
        num_frames: frames to generate when ``noise`` is a callable (None: endless); must match a noise tensor.
        context_latents: [B, C, f, H, W] clean normalised latents (an encoded image or clip) committed first as
            context (see :func:`commit_context`); they are not yielded, the generated blocks follow them.
        prompt_switches: {latent frame: prompt_embeds [B, Ltext, text_dim]}: from that frame (a block start, counted
            from the start of the video, context included) the new prompt is used; the cache is re-computed under
            it first (:func:`recache`). Blocks before a switch are exactly those of a run without it.
        keep_sink_on_switch: at a switch, keep a rolling cache's sink frames as committed under the old prompt.
    Yields:
        :class:`RolloutBlock` per block, after its clean-context pass.
    """
    training = exit_step is not None
    per_call_noise = callable(noise) and not isinstance(noise, torch.Tensor)
    if per_call_noise:
        if kv_cache is None:
            raise ValueError("noise drawn block by block (a callable) needs a kv_cache")
        if num_frames is None and not kv_cache.rolling:
            raise ValueError(
                "an endless rollout (num_frames=None) needs a rolling KV cache (new_kv_cache(..., window_frames=...)): "
                "a full cache holds a fixed number of frames"
            )
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 or None (endless), got {num_frames}")
        if num_frames is None and (training or gradient_blocks is not None):
            raise ValueError("a training rollout (exit_step) needs a finite num_frames")
        batch = prompt_embeds.shape[0]
        total = num_frames
        block_noise = noise
    else:
        if noise.ndim != 5:
            raise ValueError(f"noise must be [B, C, F, H, W], got {tuple(noise.shape)}")
        batch, _, total, height, width = noise.shape
        if num_frames is not None and num_frames != total:
            raise ValueError(f"num_frames={num_frames} but the noise has {total} frames")
        if prompt_embeds.shape[0] != batch:
            raise ValueError(f"prompt_embeds batch {prompt_embeds.shape[0]} != latent batch {batch}")

        def block_noise(offset_frame: int, size: int) -> torch.Tensor:
            return noise[:, :, offset_frame : offset_frame + size]

    if exit_step is not None and exit_step < 0:
        raise ValueError(f"exit_step must be >= 0, got {exit_step}")
    if gradient_blocks is not None and (exit_step is None or gradient_blocks < 0):
        raise ValueError("gradient_blocks needs exit_step and must be >= 0")
    if prompt_switches and training:
        raise ValueError("prompt_switches are not supported by a training rollout (exit_step)")
    frames_per_block = frames_per_block or transformer.config.frames_per_block
    model_dtype = transformer.proj_out.weight.dtype
    if context_latents is not None and (
        context_latents.ndim != 5 or context_latents.shape[0] != batch
        or (not per_call_noise and context_latents.shape[1:2] + context_latents.shape[3:]
            != noise.shape[1:2] + noise.shape[3:])
    ):
        raise ValueError(
            f"context_latents must be [{batch}, C, f, H, W] matching the noise's C, H, W, "
            f"got {tuple(context_latents.shape)}"
        )
    if kv_cache is None:
        context = 0 if context_latents is None else context_latents.shape[2]
        frames = context + frames_to_cache(total, frames_per_block, commit_last_block)
        kv_cache = transformer.new_kv_cache(batch, max(frames, 1), height, width, device=noise.device)
    first_frame = kv_cache.committed_frames + (0 if context_latents is None else context_latents.shape[2])
    switches = dict(prompt_switches or {})
    _check_switches(switches, first_frame, total, frames_per_block, batch)
    if context_latents is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not training):
            commit_context(transformer, kv_cache, context_latents, prompt_embeds.to(model_dtype),
                           frames_per_block=frames_per_block, context_timestep=context_timestep)
    sample_noise = noise_sampler or generator_noise_sampler(generator)
    prompt_embeds = prompt_embeds.to(model_dtype)

    def commit(block: RolloutBlock) -> None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not training):
            _commit_forward(transformer, kv_cache, block.latents, prompt_embeds, block.start_frame, context_timestep)

    grad_enabled = torch.is_grad_enabled()
    num_blocks = None if total is None else len(block_sizes(total, frames_per_block))
    first_grad_block = 0 if gradient_blocks is None else num_blocks - gradient_blocks
    pending: RolloutBlock | None = None  # denoised, waiting for its clean-context pass
    # the first block's timesteps and every later block's, warped and checked once, not per block
    schedules = [scheduler.block_timesteps(i, denoising_timesteps, first_block_timesteps) for i in (0, 1)]
    offset = 0
    for index, size, is_last, next_size in _block_plan(total, frames_per_block):
        start = first_frame + offset
        if start in switches:
            if pending is not None:  # the block before the switch is committed under its own prompt
                commit(pending)
                pending = None
            prompt_embeds = switches.pop(start).to(model_dtype)
            recache(transformer, kv_cache, prompt_embeds, keep_sink=keep_sink_on_switch,
                    context_timestep=context_timestep)
        timesteps = schedules[min(index, 1)]
        if training:
            timesteps = timesteps[: min(exit_step, len(timesteps) - 1) + 1]
        x = block_noise(offset, size) if not per_call_noise else _checked_block_noise(block_noise, start, size, batch)
        values = timesteps.tolist()
        for step, t in enumerate(values):
            t_frames = torch.full((batch, size), t, device=x.device, dtype=torch.float32)
            records_grad = training and grad_enabled and step + 1 == len(values) and index >= first_grad_block
            if records_grad and pending is not None:  # the context pass stays out of a forward that records autograd
                commit(pending)
                pending = None
            with torch.set_grad_enabled(records_grad or (grad_enabled and not training)):
                if pending is not None:  # fused: commit the previous block and take this block's first step at once
                    done = pending.latents.shape[2]
                    t_clean = torch.full((batch, done), context_timestep, device=x.device)
                    flow = transformer(
                        torch.cat([pending.latents, x], dim=2).to(model_dtype), torch.cat([t_clean, t_frames], dim=1),
                        prompt_embeds, kv_cache=kv_cache, start_frame=pending.start_frame, commit_frames=done,
                    ).sample[:, :, done:]
                    kv_cache.store_latents(pending.start_frame, pending.latents)
                    pending = None
                else:
                    flow = transformer(
                        x.to(model_dtype), t_frames, prompt_embeds, start_frame=start,
                        kv_cache=_gradient_view(kv_cache, size) if records_grad else kv_cache,
                    ).sample
                x0 = scheduler.x0_from_flow(x, flow.to(x.dtype), t)
            if step + 1 < len(values):
                fresh = sample_noise(tuple(x0.shape), torch.float32, x0.device).to(x0.dtype)
                x = scheduler.add_noise(x0, fresh, values[step + 1])
        block = RolloutBlock(index=index, start_frame=start, latents=x0, timesteps=timesteps)
        if index == 0 and not training:  # say where NaN/Inf come from, rather than make a black video
            check_first_block(x0, transformer, prompt_embeds=prompt_embeds, context_latents=context_latents,
                              noise=None if per_call_noise else noise)
        if on_block_denoised is not None:
            replaced = on_block_denoised(block)
            if replaced is not None:
                check_finite_inputs(**{"the latents returned by on_block_denoised (callback_on_step_end)": replaced})
                block.latents = replaced
        # a rolling cache that must evict for the next block would evict before this block's clean pass: keep it apart;
        # a block before a prompt switch is committed at the switch, unfused
        if fuse_context_pass and not is_last and kv_cache.fits(size + next_size) and start + size not in switches:
            pending = block
        elif not is_last or commit_last_block:
            commit(block)
        yield block
        offset += size


def _checked_block_noise(block_noise: BlockNoise, start: int, size: int, batch: int) -> torch.Tensor:
    x = block_noise(start, size)
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[0] != batch or x.shape[2] != size:
        raise ValueError(
            f"the noise callable must return [{batch}, C, {size}, H, W] for frames {start}..{start + size - 1}, "
            f"got {tuple(getattr(x, 'shape', ()))}"
        )
    return x


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
