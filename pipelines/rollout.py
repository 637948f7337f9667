"""The autoregressive rollout as one call: a :class:`~.session.GenerationSession` driven to the end.

:func:`causal_rollout` yields the blocks of a video (with a context, prompt switches, an endless stream); the
benchmarks and the reference-parity tests call it (the pipeline drives its own session, block by block). The steps
it is made of live in :mod:`.block_steps` and the state in :mod:`.session`; training has its own loop over the same
steps (``training/rollout.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterator, Mapping

import torch

from .block_steps import PromptHandle, RolloutBlock, commit_context, recache
from .checks import check_finite_inputs
from .kv_cache import KVCache
from .scheduling_one_forcing import OneForcingScheduler
from .session import BlockNoise, CachePolicy, GenerationSession, NoiseSampler, NoiseSource, SamplingSettings

__all__ = ["RolloutBlock", "RolloutOptions", "causal_rollout", "commit_context", "recache"]


@dataclass(frozen=True)
class RolloutOptions:
    """The keyword arguments of :func:`causal_rollout`.

    Args:
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
        num_frames: frames to generate when ``noise`` is a callable (None: endless); must match a noise tensor.
        context_latents: [B, C, f, H, W] clean normalised latents (an encoded image or clip) committed first as
            context (see :func:`commit_context`); they are not yielded, the generated blocks follow them.
        prompt_switches: {latent frame: prompt_embeds [B, Ltext, text_dim]}: from that frame (a block start, counted
            from the start of the video, context included) the new prompt is used; the cache is re-computed under
            it first (:func:`recache`). Blocks before a switch are exactly those of a run without it.
        keep_sink_on_switch: at a switch, keep a rolling cache's sink frames as committed under the old prompt.
    """

    frames_per_block: int | None = None
    denoising_timesteps: list[float] | None = None
    first_block_timesteps: list[float] | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    noise_sampler: NoiseSampler | None = None
    kv_cache: KVCache | None = None
    context_timestep: float = 0.0
    commit_last_block: bool = False
    fuse_context_pass: bool = True
    on_block_denoised: Callable[[RolloutBlock], torch.Tensor | None] | None = None
    num_frames: int | None = None
    context_latents: torch.Tensor | None = None
    prompt_switches: Mapping[int, torch.Tensor] | None = None
    keep_sink_on_switch: bool = False

    @classmethod
    def of(cls, options: dict) -> "RolloutOptions":
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"causal_rollout() got unexpected keyword arguments {sorted(unknown)} (training rollouts "
                            "with an exit step are training.rollout.self_forcing_blocks)")
        return cls(**options)


def causal_rollout(
    transformer,
    scheduler: OneForcingScheduler,
    noise: torch.Tensor | BlockNoise,
    prompt_embeds: torch.Tensor | PromptHandle,
    **options,
) -> Iterator[RolloutBlock]:
    """Generate the video block by block.

    Args:
        noise: [B, C, F, H, W] initial noise of the frames to generate (float32 recommended), or a :data:`BlockNoise`
            callable drawing each block's noise when it is needed (then ``num_frames`` says how many frames to
            generate, None = without end, and ``kv_cache`` must be given; an endless rollout needs a rolling cache).
        prompt_embeds: [B, Ltext, text_dim] (or a :class:`PromptHandle`); its cross-attention is cached once.
        options: :class:`RolloutOptions`.
    Yields:
        :class:`RolloutBlock` per block (before its clean-context pass when that is fused into the next block's).
    """
    opts = RolloutOptions.of(options)
    session = _session(transformer, scheduler, noise, prompt_embeds, opts)
    switches = dict(opts.prompt_switches or {})
    for frame, embeds in switches.items():
        session.layout.check_switch(frame)
        if embeds.ndim != 3 or embeds.shape[0] != session.prompt.batch_size:
            raise ValueError(f"prompt switch at latent frame {frame}: embeddings must be "
                             f"[{session.prompt.batch_size}, L, D], got {tuple(embeds.shape)}")
    while not session.finished:
        if session.next_block_info.start in switches:
            session.set_prompt(switches.pop(session.next_block_info.start), keep_sink=opts.keep_sink_on_switch)
        block = session.generate()
        if opts.on_block_denoised is not None:
            replaced = opts.on_block_denoised(block)
            if replaced is not None:
                check_finite_inputs(**{"the latents returned by on_block_denoised (callback_on_step_end)": replaced})
                block.latents = replaced
        session.finalize(block)
        yield block


def _session(transformer, scheduler, noise, prompt_embeds, opts: RolloutOptions) -> GenerationSession:
    """The session of a :func:`causal_rollout` call, its arguments checked."""
    prompt = PromptHandle.of(prompt_embeds, transformer.proj_out.weight.dtype)
    batch, context = prompt.batch_size, opts.context_latents
    if isinstance(noise, torch.Tensor):
        num_frames = noise.shape[2] if noise.ndim == 5 else None
        if opts.num_frames is not None and opts.num_frames != num_frames:
            raise ValueError(f"num_frames={opts.num_frames} but the noise has {num_frames} frames")
        if noise.ndim == 5 and noise.shape[0] != batch:
            raise ValueError(f"prompt_embeds batch {batch} != latent batch {noise.shape[0]}")
    else:
        if opts.kv_cache is None:
            raise ValueError("noise drawn block by block (a callable) needs a kv_cache")
        num_frames = opts.num_frames
    same_size = not isinstance(noise, torch.Tensor) or (
        context is not None and context.shape[1:2] + context.shape[3:] == noise.shape[1:2] + noise.shape[3:])
    if context is not None and (context.ndim != 5 or context.shape[0] != batch or not same_size):
        raise ValueError(f"context_latents must be [{batch}, C, f, H, W] matching the noise's C, H, W, "
                         f"got {tuple(context.shape)}")
    held = opts.kv_cache.committed_frames if opts.kv_cache is not None else 0
    first = held + (0 if context is None else context.shape[2])
    layout = transformer.block_layout(opts.frames_per_block, num_frames, first)
    if isinstance(noise, torch.Tensor):
        source = NoiseSource.from_latents(noise, first, opts.generator, opts.noise_sampler)
    else:
        source = NoiseSource.from_callable(noise, opts.generator, opts.noise_sampler, opts.kv_cache.device)
    sampling = SamplingSettings(opts.denoising_timesteps, opts.first_block_timesteps, opts.context_timestep,
                                opts.fuse_context_pass)
    return GenerationSession(transformer, scheduler, prompt, layout, source, context=context,
                             cache_policy=CachePolicy(commit_last_block=opts.commit_last_block),
                             kv_cache=opts.kv_cache, sampling=sampling)
