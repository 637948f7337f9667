"""The explicit key/value cache of the causal rollout.

One object holds, for every transformer layer, preallocated self-attention key/value buffers and the cross-attention
keys/values of the current prompt. Nothing is hidden in the model: the rollout creates a cache, passes it to each
forward, and decides when a block is committed.

Rules of the self-attention buffers (``slots = capacity_frames * tokens_per_frame`` per layer):
- a forward whose first latent frame is ``s`` owns the slots right after the cached frames; its queries attend to the
  cached (committed) frames plus its own tokens;
- denoising passes use the forward's own slots as scratch, but only committed frames stay: ``committed_frames`` is
  what later blocks see, so noisy keys never reach them;
- keys are stored already rotated;
- beside the keys, the cache can hold the clean latents each cached frame was committed from
  (:meth:`store_latents`; the rollout does it), moved and evicted with the keys, so the frames still in the cache can
  be committed again under another prompt (the KV re-cache of a prompt switch, :func:`block_steps.recache`).

Two ways to hold a video:
- **full** (``window_frames=None``): one slot per latent frame of the video; positions are absolute frame indices.
- **rolling** (``window_frames=W``): the first ``sink_frames`` committed frames stay forever, followed by the ``W``
  most recent ones; older frames are evicted, so memory is constant however long the video. Rotary time positions are
  either absolute (exactly the reference behaviour, limited by the 1024-position table) or ``relative`` to the cache:
  a frame's position is its slot, and keys that move down on eviction are rotated back by the same number of frames,
  so positions never run out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

TimeShift = Callable[[int, torch.device], tuple[torch.Tensor, torch.Tensor]]

"""(delta_frames, device) -> (cos, sin) [D/2]: rotation that moves keys along the time axis."""


@dataclass
class CrossAttentionEntry:
    key: torch.Tensor  # [B, Ltext, H, D]
    value: torch.Tensor  # [B, Ltext, H, D]


@dataclass(frozen=True)
class RollingWindow:
    """A rolling cache keeps the ``sink_frames`` first committed frames and the ``window_frames`` most recent ones;
    ``relative_positions``: rotary time positions relative to the cache, which needs the transformer's time-axis
    rotation ``time_shift`` (``WanRotaryTables.time_shift``)."""

    window_frames: int
    sink_frames: int = 0
    relative_positions: bool = False
    time_shift: TimeShift | None = None

    def __post_init__(self):
        if self.window_frames < 1 or self.sink_frames < 0:
            raise ValueError(f"window_frames must be >= 1 and sink_frames >= 0, got {self.window_frames}, "
                             f"{self.sink_frames}")
        if self.relative_positions and self.time_shift is None:
            raise ValueError("relative_positions needs the transformer's time_shift rotation")


@dataclass
class KVCacheState:
    """What :meth:`KVCache.snapshot` copied: per-layer keys/values [B, cached tokens, H, D], cross-attention entries
    and the prompt they belong to, (committed, cached, evicted) frame counters, clean latents and their flags."""

    key: list[torch.Tensor]
    value: list[torch.Tensor]
    cross: list[CrossAttentionEntry | None]
    prompt_key: Hashable | None
    counters: tuple[int, int, int]
    latents: torch.Tensor | None
    flags: tuple[list[bool], list[bool]]


class KVCache:
    """Per-layer self-attention buffers [B, capacity * tokens_per_frame, H, D] plus cross-attention keys/values.

    Args:
        num_layers, batch_size: sizes.
        num_frames: latent frames of the video (full cache); ignored for the capacity of a rolling cache.
        tokens_per_frame: (H / patch_h) * (W / patch_w) tokens of one latent frame.
        num_heads, head_dim: attention geometry of the transformer.
        window: a :class:`RollingWindow` makes a rolling cache (default: a full one).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_frames: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        window: RollingWindow | None = None,
    ):
        if min(num_layers, batch_size, num_frames, tokens_per_frame, num_heads, head_dim) < 1:
            raise ValueError("every KV cache size must be positive")
        window_frames, sink_frames, relative_positions, time_shift = (
            (None, 0, False, None) if window is None
            else (window.window_frames, window.sink_frames, window.relative_positions, window.time_shift))
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.tokens_per_frame = tokens_per_frame
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rolling = window_frames is not None
        self.sink_frames = sink_frames
        self.window_frames = window_frames
        self.relative_positions = relative_positions
        self.time_shift = time_shift
        self.capacity = sink_frames + window_frames if self.rolling else num_frames
        shape = (batch_size, self.capacity * tokens_per_frame, num_heads, head_dim)
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.cross: list[CrossAttentionEntry | None] = [None] * num_layers
        self._cross_storage: list[CrossAttentionEntry | None] = [None] * num_layers  # kept across prompts
        self._cross_source: Hashable | None = None  # the prompt the cross-attention entries belong to
        self.committed_frames = 0  # frames of the video committed so far
        self.cached_frames = 0  # of them, frames held in the buffers now
        self.evicted_frames = 0
        self._slot = 0  # first slot of the forward in progress
        self._beyond_end = False  # the forward in progress has uncommitted frames past the end of a full cache
        self.latents: torch.Tensor | None = None  # [B, C, capacity, h, w] clean latents per slot, made on first store
        self._latents_stored = [False] * self.capacity
        self._commit_starts = [False] * self.capacity  # slot holds the first frame of one committing forward

    @property
    def num_frames(self) -> int:
        return self.capacity

    @property
    def forward_slot(self) -> int:
        """First slot of the forward in progress (set by :meth:`begin_forward`)."""
        return self._slot

    @property
    def position(self) -> tuple[int, int, int]:
        """(capacity, forward slot, cached frames): what the arithmetic of a forward reads of the cache besides its
        buffers; two forwards at the same position run the same kernels on the same memory."""
        return self.capacity, self._slot, self.cached_frames

    @property
    def dtype(self) -> torch.dtype:
        return self.key[0].dtype

    @property
    def device(self) -> torch.device:
        return self.key[0].device

    def reset(self) -> None:
        """Forget the video and the prompt; the buffers are kept (no reallocation)."""
        self.committed_frames = self.cached_frames = self.evicted_frames = 0
        self._latents_stored = [False] * self.capacity
        self._commit_starts = [False] * self.capacity
        self.reset_cross_attention()

    def reset_cross_attention(self) -> None:
        self.cross = [None] * self.num_layers
        self._cross_source = None

    # -- self-attention -------------------------------------------------------------------------------------------
    def begin_forward(self, start_frame: int, num_frames: int, batch_size: int, tokens_per_frame: int,
                      commit_frames: int | None = None) -> int:
        """Check a forward over frames [start_frame, start_frame + num_frames), make room, and return the rotary time
        position of its first frame.

        In a full cache, the frames past its end may belong to a forward that does not commit them (``commit_frames``,
        its first frames to commit, given): a video's last block, which no later block attends to, needs no slots.
        """
        if batch_size != self.batch_size or tokens_per_frame != self.tokens_per_frame:
            raise ValueError(
                f"KV cache was made for batch {self.batch_size} x {self.tokens_per_frame} tokens per frame, "
                f"got batch {batch_size} x {tokens_per_frame}"
            )
        if start_frame < 0 or start_frame > self.committed_frames:
            raise ValueError(
                f"block starts at frame {start_frame} but {self.committed_frames} frames are committed: "
                "blocks must be generated in order"
            )
        self._beyond_end = False
        if not self.rolling:
            if start_frame + num_frames > self.capacity:
                if commit_frames is None or start_frame + commit_frames > self.capacity:
                    raise ValueError(
                        f"block frames {start_frame}..{start_frame + num_frames - 1} do not fit the KV cache of "
                        f"{self.capacity} latent frames (frames past its end can only be denoised, not committed)"
                    )
                self._beyond_end = True
            self._slot = start_frame
            return start_frame
        if start_frame != self.committed_frames:
            raise ValueError("a rolling KV cache only takes the next frames (re-running committed frames: recache)")
        room = self.capacity - min(self.cached_frames, self.sink_frames)
        if num_frames > room:
            raise ValueError(f"a forward of {num_frames} frames does not fit a window of {self.window_frames} frames")
        overflow = self.cached_frames + num_frames - self.capacity
        if overflow > 0:
            self._evict(overflow)
        self._slot = self.cached_frames
        return self._slot if self.relative_positions else start_frame

    def fits(self, num_frames: int) -> bool:
        """Whether a forward of ``num_frames`` new frames needs no eviction."""
        return not self.rolling or self.cached_frames + num_frames <= self.capacity

    def _evict(self, frames: int) -> None:
        """Drop the oldest ``frames`` non-sink frames; later frames move down (and, relative, back in time)."""
        tpf = self.tokens_per_frame
        keep_from = (self.sink_frames + frames) * tpf
        end = self.cached_frames * tpf
        to = self.sink_frames * tpf
        moved = end - keep_from
        shift = self.time_shift(-frames, self.device) if self.relative_positions else None
        for layer in range(self.num_layers):
            for buffers, rotate in ((self.key, True), (self.value, False)):
                block = buffers[layer][:, keep_from:end].clone()
                if rotate and shift is not None:
                    block = _rotate(block, *shift)
                buffers[layer][:, to : to + moved] = block
        first, last = self.sink_frames + frames, self.cached_frames
        if self.latents is not None:
            self.latents[:, :, self.sink_frames : last - frames] = self.latents[:, :, first:last].clone()
        for flags in (self._latents_stored, self._commit_starts):
            flags[self.sink_frames : last - frames] = flags[first:last]
            flags[last - frames : last] = [False] * frames
        self.cached_frames -= frames
        self.evicted_frames += frames

    def attend(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, commit_frames: int,
        stored: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values visible to the forward begun by :meth:`begin_forward`: cached frames + its own frames.

        The forward's first ``commit_frames`` frames are clean context being committed; the transformer lets their
        queries see only keys up to their own end.

        Args:
            key, value: [B, f * tokens_per_frame, H, D] of the forward's frames (keys already rotated).
            stored: what to store of the forward instead of ``key``/``value`` (same shapes), given when these must
                not enter the shared buffers themselves (the caller's tensors carry history of their own): the
                forward's keys are then used apart, and only its committed frames are stored, from ``stored``.
        Returns:
            two [B, (slot + f) * tokens_per_frame, H, D] tensors.
        """
        begin = self._slot * self.tokens_per_frame
        end = begin + key.shape[1]
        committed_end = begin + commit_frames * self.tokens_per_frame
        overwrites_context = self._slot < self.cached_frames and commit_frames == 0
        if overwrites_context or self._beyond_end or stored is not None:
            # non-committing re-runs of cached frames must not write the shared buffers, and frames past the end of
            # the cache have no slots
            stored_key, stored_value = stored if stored is not None else (key, value)
            if commit_frames:
                self.key[layer][:, begin:committed_end] = stored_key[:, : committed_end - begin]
                self.value[layer][:, begin:committed_end] = stored_value[:, : committed_end - begin]
            return (
                torch.cat([self.key[layer][:, :begin], key], dim=1),
                torch.cat([self.value[layer][:, :begin], value], dim=1),
            )
        self.key[layer][:, begin:end] = key
        self.value[layer][:, begin:end] = value
        return self.key[layer][:, :end], self.value[layer][:, :end]

    def commit(self, start_frame: int, num_frames: int) -> None:
        """Mark frames [start_frame, start_frame + num_frames) of the current forward as context for later blocks."""
        self.committed_frames = max(self.committed_frames, start_frame + num_frames)
        self.cached_frames = max(self.cached_frames, self._slot + num_frames)

    # -- clean latents and re-cache ---------------------------------------------------------------------------------
    def slot_of(self, frame: int) -> int:
        """Slot of committed video frame ``frame`` (ValueError if it was evicted or is not committed)."""
        if frame < 0 or frame >= self.committed_frames:
            raise ValueError(f"frame {frame} is not committed ({self.committed_frames} frames are)")
        slot = frame if frame < self.sink_frames else frame - self.evicted_frames
        if slot < self.sink_frames and frame >= self.sink_frames:
            raise ValueError(f"frame {frame} was evicted from the rolling KV cache")
        return slot

    def store_latents(self, start_frame: int, latents: torch.Tensor) -> None:
        """Keep the clean latents [B, C, f, h, w] that committed frames [start_frame, start_frame + f) came from
        (values without autograd history: the cache stores, it does not train).

        The frames are remembered as one group: a re-cache commits them again together, as they were committed.
        """
        if latents.ndim != 5 or latents.shape[0] != self.batch_size:
            raise ValueError(f"latents must be [{self.batch_size}, C, f, h, w], got {tuple(latents.shape)}")
        frames = latents.shape[2]
        first = self.slot_of(start_frame)
        if frames > 1:
            self.slot_of(start_frame + frames - 1)
        shape = (latents.shape[0], latents.shape[1], self.capacity, *latents.shape[3:])
        if self.latents is None or self.latents.shape != shape:
            self.latents = torch.zeros(shape, dtype=latents.dtype, device=latents.device)
            self._latents_stored = [False] * self.capacity
            self._commit_starts = [False] * self.capacity
        self.latents[:, :, first : first + frames] = latents.to(self.latents.dtype)
        self._latents_stored[first : first + frames] = [True] * frames
        self._commit_starts[first : first + frames] = [True] + [False] * (frames - 1)

    def recache_groups(self, keep_sink: bool = False) -> list[tuple[int, int, int]]:
        """The cached frames in the groups they were committed in: [(first video frame, first slot, frames)], in order.

        A group is also cut where the cache is not contiguous in time (after the sink of a cache that evicted frames).
        ``keep_sink`` leaves out a rolling cache's first ``sink_frames`` frames.
        """
        if self.evicted_frames:
            runs = [(0, 0, self.sink_frames), (self.sink_frames + self.evicted_frames, self.sink_frames,
                                              self.cached_frames - self.sink_frames)]
        else:
            runs = [(0, 0, self.cached_frames)]
        if keep_sink:
            skip = min(self.sink_frames, self.cached_frames)
            frame, slot, count = runs[0]
            runs[0] = (frame + skip, slot + skip, count - skip)
        groups = []
        for frame, slot, count in runs:
            begin = 0
            for i in range(1, count + 1):
                if i == count or self._commit_starts[slot + i]:
                    groups.append((frame + begin, slot + begin, i - begin))
                    begin = i
        return groups

    def stored_latents(self, slot: int, frames: int) -> torch.Tensor:
        """Clean latents [B, C, frames, h, w] of slots [slot, slot + frames) (ValueError if some were never stored)."""
        if self.latents is None or not all(self._latents_stored[slot : slot + frames]):
            raise ValueError(
                "the KV cache does not hold the clean latents of all its frames, so it cannot be recomputed: frames "
                "committed outside a generation session need kv_cache.store_latents(start_frame, latents)"
            )
        return self.latents[:, :, slot : slot + frames]

    def rewind(self, frame: int, slot: int) -> None:
        """Make the next forward write video frame ``frame`` at ``slot`` (a cached position): for re-committing the
        cached frames under a new prompt. The counters grow back as the frames are committed again."""
        if not 0 <= slot <= self.cached_frames or (slot != frame and slot != frame - self.evicted_frames):
            raise ValueError(f"cannot rewind to frame {frame} at slot {slot}: not a cached position")
        self.committed_frames, self.cached_frames = frame, slot

    # -- cross-attention ------------------------------------------------------------------------------------------
    def store_cross_attention(self, layer: int, entry: CrossAttentionEntry) -> CrossAttentionEntry:
        """Keep ``layer``'s cross-attention keys/values of the current prompt and return the kept entry.

        A later prompt's entries of the same shape are copied into the same tensors, so the cache's memory addresses
        stay fixed from prompt to prompt (:meth:`buffer_addresses`).
        """
        kept = self._cross_storage[layer]
        writable = kept is not None and (torch.is_inference_mode_enabled() or not kept.key.is_inference())
        if writable and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in ((kept.key, entry.key), (kept.value, entry.value))
        ):
            kept.key.copy_(entry.key)
            kept.value.copy_(entry.value)
        else:
            kept = self._cross_storage[layer] = CrossAttentionEntry(entry.key.contiguous(), entry.value.contiguous())
        self.cross[layer] = kept
        return kept

    def buffer_addresses(self) -> tuple[int, ...]:
        """Data pointers of every buffer a forward reads or writes (self- and cross-attention), in a fixed order."""
        cross = [t.data_ptr() for e in self.cross if e is not None for t in (e.key, e.value)]
        return tuple(t.data_ptr() for t in self.key + self.value) + tuple(cross)

    def cross_attention_for(self, prompt_key: Hashable) -> bool:
        """Whether the stored cross-attention keys/values were made from the prompt identified by ``prompt_key``.

        Another key (a new prompt) clears them so they are recomputed once.
        """
        if self._cross_source is None or self._cross_source != prompt_key:
            self.reset_cross_attention()
            self._cross_source = prompt_key
            return False
        return self.cross[0] is not None

    # -- snapshots ------------------------------------------------------------------------------------------------
    def snapshot(self) -> "KVCacheState":
        """A copy of what the cache holds now (the cached frames' keys/values, clean latents, cross-attention and
        counters), to :meth:`restore` later: rewinding or branching a video."""
        used = self.cached_frames * self.tokens_per_frame
        cross = [None if e is None else CrossAttentionEntry(e.key.clone(), e.value.clone()) for e in self.cross]
        return KVCacheState(
            key=[k[:, :used].clone() for k in self.key], value=[v[:, :used].clone() for v in self.value],
            cross=cross, prompt_key=self._cross_source,
            counters=(self.committed_frames, self.cached_frames, self.evicted_frames),
            latents=None if self.latents is None else self.latents.clone(),
            flags=(list(self._latents_stored), list(self._commit_starts)),
        )

    def restore(self, state: "KVCacheState") -> None:
        """Go back to a :meth:`snapshot` of this cache; the buffers keep their addresses."""
        used = state.key[0].shape[1]
        if len(state.key) != self.num_layers or used > self.key[0].shape[1]:
            raise ValueError("the snapshot was taken from a KV cache of another size")
        for layer in range(self.num_layers):
            self.key[layer][:, :used] = state.key[layer]
            self.value[layer][:, :used] = state.value[layer]
        self.committed_frames, self.cached_frames, self.evicted_frames = state.counters
        self.latents = None if state.latents is None else state.latents.clone()
        self._latents_stored, self._commit_starts = (list(f) for f in state.flags)
        self.reset_cross_attention()
        if state.cross[0] is not None:
            for layer, entry in enumerate(state.cross):
                self.store_cross_attention(layer, entry)
            self._cross_source = state.prompt_key

    def memory_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.key + self.value)
        total += sum(e.key.numel() * e.key.element_size() * 2 for e in self.cross if e is not None)
        if self.latents is not None:
            total += self.latents.numel() * self.latents.element_size()
        return total


def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of [B, L, H, D] keys by per-pair angles (cos, sin [D/2]), float32 math."""
    pairs = keys.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs.unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(keys.dtype)


