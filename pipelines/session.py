"""A generation session: the state of one autoregressive video, advanced one block at a time.

The shape of streaming-video serving code: the global conditions (the prompt, the block layout, the KV cache policy,
a noise source) make the cache once; :meth:`GenerationSession.next_block` denoises the next block, finalizes it into
the cache and returns its clean latents; the caller decides what comes next: another block, a new prompt
(:meth:`~GenerationSession.set_prompt`, with KV re-cache), or a rewind / branch to a
:meth:`~GenerationSession.snapshot`. ``OneForcingPipeline.__call__`` / ``stream`` and :func:`~.rollout.causal_rollout`
are thin drivers of a session.

Example::

    layout = transformer.block_layout(num_frames=21)
    session = GenerationSession(transformer, scheduler, PromptHandle(embeds), layout,
                                NoiseSource.from_generator(generator, (1, 16, 60, 104), device))
    first = session.next_block().latents
    saved = session.snapshot()
    ...
    session.restore(saved)  # continue from block 1 again, e.g. with session.set_prompt(other)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .block_steps import (
    PromptHandle,
    RolloutBlock,
    commit_and_denoise_forward,
    commit_context,
    commit_forward,
    denoise_forward,
    recache,
)
from .checks import check_first_block
from .kv_cache import KVCache, KVCacheState
from .layout import Block, BlockLayout
from .scheduling_one_forcing import OneForcingScheduler

NoiseSampler = Callable[[tuple, torch.dtype, torch.device], torch.Tensor]
"""Draws the fresh noise of a re-noising step: (shape [B, C, f, H, W], dtype, device) -> tensor."""

BlockNoise = Callable[[int, int], torch.Tensor]
"""Initial noise drawn block by block: (start_frame, num_frames) -> [B, C, num_frames, H, W]."""

Generator = torch.Generator | list[torch.Generator] | None


@dataclass(frozen=True)
class CachePolicy:
    """What the KV cache keeps: every committed frame (``window_frames=None``, a full cache sized by the layout) or a
    rolling window of the ``window_frames`` latest frames after ``sink_frames`` first ones, with rotary positions
    ``relative_positions`` to the cache. ``commit_last_block``: also commit the final block (to continue the video
    afterwards)."""

    window_frames: int | None = None
    sink_frames: int = 0
    relative_positions: bool = False
    commit_last_block: bool = False

    def make(self, transformer, layout: BlockLayout, batch: int, latent_size: tuple[int, int], device) -> KVCache:
        """A new cache for ``batch`` videos of ``latent_size`` (h, w) laid out as ``layout``."""
        frames = 1 if self.window_frames is not None else layout.cache_frames(self.commit_last_block)
        return transformer.new_kv_cache(batch, frames, *latent_size, device=device, **self.rolling_settings())

    def rolling_settings(self) -> dict:
        """The keyword arguments of ``new_kv_cache`` beyond the size."""
        return dict(window_frames=self.window_frames, sink_frames=self.sink_frames,
                    relative_positions=self.relative_positions)


@dataclass(frozen=True)
class SamplingSettings:
    """How each block is denoised: un-warped timestep lists overriding the scheduler's (every block's, the first
    block's), the timestep of the clean-context pass (0 = clean) and whether a block's clean-context pass is fused
    into the next block's first denoising forward (same result, fewer forwards)."""

    denoising_timesteps: list[float] | None = None
    first_block_timesteps: list[float] | None = None
    context_timestep: float = 0.0
    fuse_context_pass: bool = True


class NoiseSource:
    """The noise of a video: each block's initial noise and the fresh noise of its re-noising steps.

    Make one with :meth:`from_generator` (each block's noise drawn when it starts), :meth:`from_latents` (the initial
    noise of every generated frame given up front) or :meth:`from_callable`. The fresh noise comes from ``generator``
    (or ``sampler``). :meth:`state` / :meth:`set_state` save and restore the generators' states (the global RNG's
    when ``generator`` is None), so a restored session draws the same noise again.
    """

    def __init__(self, generator: Generator = None, *, initial: BlockNoise | None = None,
                 sampler: NoiseSampler | None = None, device: torch.device | str = "cpu",
                 shape: tuple[int, int, int, int] | None = None):
        self.generator = generator
        self.device = torch.device(device)
        self.shape = shape  # (B, C, h, w) of the latents, where known
        self._initial = initial
        self._sampler = sampler

    @classmethod
    def from_generator(cls, generator: Generator, shape: tuple[int, int, int, int], device) -> "NoiseSource":
        """Each block's noise [B, C, f, h, w] drawn from ``generator`` when the block starts; ``shape``:
        (B, C, h, w)."""
        batch, channels, height, width = shape

        def initial(start: int, size: int) -> torch.Tensor:
            return randn_tensor((batch, channels, size, height, width), generator=generator,
                                device=torch.device(device), dtype=torch.float32)

        return cls(generator, initial=initial, device=device, shape=shape)

    @classmethod
    def from_latents(cls, latents: torch.Tensor, first_frame: int, generator: Generator = None,
                     sampler: NoiseSampler | None = None) -> "NoiseSource":
        """Initial noise [B, C, F, h, w] of the F generated frames, the first of which is latent frame
        ``first_frame`` of the video."""
        if latents.ndim != 5:
            raise ValueError(f"noise must be [B, C, F, H, W], got {tuple(latents.shape)}")
        batch, channels, _, height, width = latents.shape

        def initial(start: int, size: int) -> torch.Tensor:
            return latents[:, :, start - first_frame : start - first_frame + size]

        return cls(generator, initial=initial, sampler=sampler, device=latents.device,
                   shape=(batch, channels, height, width))

    @classmethod
    def from_callable(cls, block_noise: BlockNoise, generator: Generator = None,
                      sampler: NoiseSampler | None = None, device="cpu") -> "NoiseSource":
        """Initial noise from ``block_noise(start_frame, size)``, checked block by block."""
        return cls(generator, initial=block_noise, sampler=sampler, device=device)

    def initial(self, block: Block, batch: int) -> torch.Tensor:
        """The initial noise [B, C, f, h, w] of ``block``."""
        x = self._initial(block.start, block.size)
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[0] != batch or x.shape[2] != block.size:
            raise ValueError(
                f"the noise must return [{batch}, C, {block.size}, H, W] for frames {block.start}..{block.end - 1}, "
                f"got {tuple(getattr(x, 'shape', ()))}"
            )
        return x

    def fresh(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh Gaussian noise shaped and typed like ``like`` (drawn in float32)."""
        if self._sampler is not None:
            noise = self._sampler(tuple(like.shape), torch.float32, like.device)
        else:
            noise = randn_tensor(tuple(like.shape), generator=self.generator, device=like.device, dtype=torch.float32)
        return noise.to(like.dtype)

    def state(self) -> list[torch.Tensor]:
        """The random state(s) the noise is drawn from."""
        if self.generator is None:
            return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda"
                                              else [])
        generators = self.generator if isinstance(self.generator, list) else [self.generator]
        return [g.get_state() for g in generators]

    def set_state(self, state: list[torch.Tensor]) -> None:
        if self.generator is None:
            torch.set_rng_state(state[0])
            if len(state) > 1:
                torch.cuda.set_rng_state(state[1], self.device)
            return
        generators = self.generator if isinstance(self.generator, list) else [self.generator]
        for g, s in zip(generators, state, strict=True):
            g.set_state(s)


@dataclass
class SessionSnapshot:
    """A session's state between two blocks (see :meth:`GenerationSession.snapshot`)."""

    cache: KVCacheState
    next_block: Block | None
    pending: RolloutBlock | None
    prompt: PromptHandle
    noise_state: list[torch.Tensor]


class GenerationSession:
    """One video being generated block by block.

    Args:
        transformer: a :class:`~.transformer_causal_wan.CausalWanTransformer3DModel`.
        scheduler: the :class:`OneForcingScheduler` of the timesteps.
        prompt: the prompt's :class:`PromptHandle` (or its embeddings [B, Ltext, text_dim]).
        layout: the :class:`BlockLayout` of the video; its ``context_frames`` are the frames committed before the
            first generated block (the ``context`` latents, after what ``kv_cache`` already holds).
        noise: the :class:`NoiseSource`.
        context: clean normalised latents [B, C, f, h, w] committed first (an encoded start image or clip).
        cache_policy: the KV cache to make (ignored when ``kv_cache`` is given).
        kv_cache: a cache to use (and continue: a video it holds goes on).
        sampling: :class:`SamplingSettings`.
    """

    def __init__(self, transformer, scheduler: OneForcingScheduler, prompt: PromptHandle | torch.Tensor,
                 layout: BlockLayout, noise: NoiseSource, *, context: torch.Tensor | None = None,
                 cache_policy: CachePolicy = CachePolicy(), kv_cache: KVCache | None = None,
                 sampling: SamplingSettings = SamplingSettings()):
        self.transformer = transformer
        self.scheduler = scheduler
        self.layout = layout
        self.noise = noise
        self.sampling = sampling
        self.cache_policy = cache_policy
        self.prompt = PromptHandle.of(prompt, transformer.proj_out.weight.dtype)
        self.kv_cache = kv_cache if kv_cache is not None else self._new_cache()
        self._check_context(context)
        # the first block's timesteps and every later block's, warped and checked once, not per block
        self._timesteps = [scheduler.block_timesteps(i, sampling.denoising_timesteps, sampling.first_block_timesteps)
                           for i in (0, 1)]
        self._timestep_values = [t.tolist() for t in self._timesteps]  # the loop's Python numbers, read once
        self._pending: RolloutBlock | None = None  # denoised, its clean-context pass fused into the next block's
        self._next: Block | None = layout.first_block()
        if context is not None:
            commit_context(self.transformer, self.kv_cache, context, self.prompt,
                           frames_per_block=layout.frames_per_block, context_timestep=sampling.context_timestep)

    def _new_cache(self) -> KVCache:
        if self.noise.shape is None:
            raise ValueError("noise drawn block by block (a callable) needs a kv_cache")
        batch, _, height, width = self.noise.shape
        return self.cache_policy.make(self.transformer, self.layout, batch, (height, width), self.noise.device)

    def _check_context(self, context: torch.Tensor | None) -> None:
        held = self.kv_cache.committed_frames + (0 if context is None else context.shape[2])
        if held != self.layout.context_frames:
            raise ValueError(f"the layout starts generating at latent frame {self.layout.context_frames} but the KV "
                             f"cache and the context hold {held} frames")
        if self.layout.endless and not self.kv_cache.rolling:
            raise ValueError("an endless rollout (num_frames=None) needs a rolling KV cache (window_frames=...): a "
                             "full cache holds a fixed number of frames")
        if context is not None and (context.ndim != 5 or context.shape[0] != self.prompt.batch_size):
            raise ValueError(f"context latents must be [{self.prompt.batch_size}, C, f, H, W], "
                             f"got {tuple(context.shape)}")

    # -- the state -----------------------------------------------------------------------------------------------------
    @property
    def next_block_info(self) -> Block | None:
        """The block :meth:`next_block` makes next (None: the video is complete)."""
        return self._next

    @property
    def finished(self) -> bool:
        return self._next is None

    def snapshot(self) -> SessionSnapshot:
        """The state between two blocks: the KV cache, the position, a block waiting for its clean-context pass, the
        prompt and the noise state. :meth:`restore` goes back to it (the cache's memory stays where it is)."""
        pending = None if self._pending is None else replace(self._pending, latents=self._pending.latents.clone())
        return SessionSnapshot(self.kv_cache.snapshot(), self._next, pending, self.prompt, self.noise.state())

    def restore(self, snapshot: SessionSnapshot) -> None:
        """Rewind (or branch) to ``snapshot``; the same noise then gives the same blocks as after the snapshot."""
        self.kv_cache.restore(snapshot.cache)
        self._next, self.prompt = snapshot.next_block, snapshot.prompt
        self._pending = None if snapshot.pending is None else replace(snapshot.pending,
                                                                      latents=snapshot.pending.latents.clone())
        self.noise.set_state(snapshot.noise_state)

    # -- advancing -----------------------------------------------------------------------------------------------------
    def set_prompt(self, prompt: PromptHandle | torch.Tensor, keep_sink: bool = False) -> None:
        """Switch the prompt from the next block on: the frames in the cache are recomputed under it (KV re-cache);
        ``keep_sink`` keeps a rolling cache's sink frames as committed under the old prompt."""
        handle = PromptHandle.of(prompt, self.transformer.proj_out.weight.dtype)
        if handle.embeds.shape[0] != self.prompt.batch_size or handle.embeds.shape[2] != self.prompt.embeds.shape[2]:
            raise ValueError(f"the new prompt's embeddings {tuple(handle.embeds.shape)} do not match the session's "
                             f"{tuple(self.prompt.embeds.shape)}")
        self._commit_pending()  # the block before the switch is committed under its own prompt
        self.prompt = handle
        recache(self.transformer, self.kv_cache, handle, keep_sink=keep_sink,
                context_timestep=self.sampling.context_timestep)

    def next_block(self) -> RolloutBlock:
        """Denoise the next block, finalize it into the KV cache and return it (clean latents [B, C, f, h, w])."""
        block = self.generate()
        self.finalize(block)
        return block

    def generate(self) -> RolloutBlock:
        """Denoise the next block without finalizing it (a caller may still replace its latents)."""
        block = self._next
        if block is None:
            raise RuntimeError("the video is complete: every block of the layout was generated")
        timesteps, values = self._timesteps[min(block.index, 1)], self._timestep_values[min(block.index, 1)]
        x = noise = self.noise.initial(block, self.prompt.batch_size)
        for step, t in enumerate(values):
            x0 = self.scheduler.x0_from_flow(x, self._flow(x, t, block).to(x.dtype), t)
            if step + 1 < len(values):
                x = self.scheduler.add_noise(x0, self.noise.fresh(x0), values[step + 1])
        if block.index == 0:  # say where NaN/Inf come from, rather than make a black video
            check_first_block(x0, self.transformer, prompt_embeds=self.prompt.embeds, noise=noise)
        return RolloutBlock(index=block.index, start_frame=block.start, latents=x0, timesteps=timesteps)

    def finalize(self, block: RolloutBlock) -> None:
        """Make ``block`` context for the blocks after it (its clean-context pass, fused into the next block's first
        forward where it can be) and move on."""
        following = self.layout.block_after(self._next)
        self._next = following
        if following is None:
            if self.cache_policy.commit_last_block:
                self._commit(block)
        elif self.sampling.fuse_context_pass and self.kv_cache.fits(block.latents.shape[2] + following.size):
            self._pending = block
        else:  # a rolling cache that must evict for the next block would evict before this block's clean pass
            self._commit(block)

    def _flow(self, x: torch.Tensor, t: float, block: Block) -> torch.Tensor:
        if self._pending is None:
            return denoise_forward(self.transformer, x, t, self.prompt, self.kv_cache, block.start)
        done, self._pending = self._pending, None
        return commit_and_denoise_forward(self.transformer, done, x, t, self.prompt, self.kv_cache,
                                          self.sampling.context_timestep)

    def _commit_pending(self) -> None:
        if self._pending is not None:
            done, self._pending = self._pending, None
            self._commit(done)

    def _commit(self, block: RolloutBlock) -> None:
        commit_forward(self.transformer, self.kv_cache, block.latents, self.prompt, block.start_frame,
                       self.sampling.context_timestep)
