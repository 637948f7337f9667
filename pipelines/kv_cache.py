"""The explicit key/value cache of the causal rollout.

One object holds, for every transformer layer, preallocated self-attention key/value buffers and the cross-attention
keys/values of the current prompt. Nothing is hidden in the model: the rollout creates a cache, passes it to each
forward, and decides when a block is committed.

Rules of the self-attention buffers (``slots = capacity_frames * tokens_per_frame`` per layer):
- a forward whose first latent frame is ``s`` owns the slots right after the cached frames; its queries attend to the
  cached (committed) frames plus its own tokens;
- denoising passes use the forward's own slots as scratch, but only committed frames stay: ``committed_frames`` is
  what later blocks see, so noisy keys never reach them;
- keys are stored already rotated.

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
from typing import Callable

import torch

TimeShift = Callable[[int, torch.device], tuple[torch.Tensor, torch.Tensor]]
"""(delta_frames, device) -> (cos, sin) [D/2]: rotation that moves keys along the time axis."""


@dataclass
class CrossAttentionEntry:
    key: torch.Tensor  # [B, Ltext, H, D]
    value: torch.Tensor  # [B, Ltext, H, D]


class KVCache:
    """Per-layer self-attention buffers [B, capacity * tokens_per_frame, H, D] plus cross-attention keys/values.

    Args:
        num_layers, batch_size: sizes.
        num_frames: latent frames of the video (full cache); ignored for the capacity of a rolling cache.
        tokens_per_frame: (H / patch_h) * (W / patch_w) tokens of one latent frame.
        num_heads, head_dim: attention geometry of the transformer.
        window_frames: make a rolling cache keeping this many most recent frames (besides the sink).
        sink_frames: first frames a rolling cache never evicts.
        relative_positions: rotary time positions relative to the cache (rolling only; needs ``time_shift``).
        time_shift: the transformer's time-axis rotation (``WanRotaryTables.time_shift``).
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
        window_frames: int | None = None,
        sink_frames: int = 0,
        relative_positions: bool = False,
        time_shift: TimeShift | None = None,
    ):
        if min(num_layers, batch_size, num_frames, tokens_per_frame, num_heads, head_dim) < 1:
            raise ValueError("every KV cache size must be positive")
        if window_frames is None and (sink_frames or relative_positions):
            raise ValueError("sink_frames and relative_positions need a rolling cache (window_frames=...)")
        if window_frames is not None and (window_frames < 1 or sink_frames < 0):
            raise ValueError(f"window_frames must be >= 1 and sink_frames >= 0, got {window_frames}, {sink_frames}")
        if relative_positions and time_shift is None:
            raise ValueError("relative_positions needs the transformer's time_shift rotation")
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
        self._cross_source: tuple | None = None
        self.committed_frames = 0  # frames of the video committed so far
        self.cached_frames = 0  # of them, frames held in the buffers now
        self.evicted_frames = 0
        self._slot = 0  # first slot of the forward in progress

    @property
    def num_frames(self) -> int:
        return self.capacity

    @property
    def dtype(self) -> torch.dtype:
        return self.key[0].dtype

    @property
    def device(self) -> torch.device:
        return self.key[0].device

    def reset(self) -> None:
        """Forget the video and the prompt; the buffers are kept (no reallocation)."""
        self.committed_frames = self.cached_frames = self.evicted_frames = 0
        self.reset_cross_attention()

    def reset_cross_attention(self) -> None:
        self.cross = [None] * self.num_layers
        self._cross_source = None

    # -- self-attention -------------------------------------------------------------------------------------------
    def begin_forward(self, start_frame: int, num_frames: int, batch_size: int, tokens_per_frame: int) -> int:
        """Check a forward over frames [start_frame, start_frame + num_frames), make room, and return the rotary time
        position of its first frame."""
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
        if not self.rolling:
            if start_frame + num_frames > self.capacity:
                raise ValueError(
                    f"block frames {start_frame}..{start_frame + num_frames - 1} do not fit the KV cache of "
                    f"{self.capacity} latent frames"
                )
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
        self.cached_frames -= frames
        self.evicted_frames += frames

    def attend(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, commit_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values visible to the forward begun by :meth:`begin_forward`: cached frames + its own frames.

        The forward's first ``commit_frames`` frames are clean context being committed; the transformer lets their
        queries see only keys up to their own end.

        Args:
            key, value: [B, f * tokens_per_frame, H, D] of the forward's frames (keys already rotated).
        Returns:
            two [B, (slot + f) * tokens_per_frame, H, D] tensors.
        """
        begin = self._slot * self.tokens_per_frame
        end = begin + key.shape[1]
        committed_end = begin + commit_frames * self.tokens_per_frame
        overwrites_context = self._slot < self.cached_frames and commit_frames == 0
        if overwrites_context or (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)):
            # Gradient-carrying or non-committing re-runs of cached frames must not write the shared buffer.
            if commit_frames:
                self.key[layer][:, begin:committed_end] = key[:, : committed_end - begin].detach()
                self.value[layer][:, begin:committed_end] = value[:, : committed_end - begin].detach()
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

    # -- cross-attention ------------------------------------------------------------------------------------------
    def cross_attention_for(self, context: torch.Tensor) -> bool:
        """Whether the stored cross-attention keys/values were made from this exact ``context`` tensor.

        A different tensor (a new prompt) clears them so they are recomputed once.
        """
        source = self._cross_source
        if source is None or source[0] is not context or source[1] != context._version:
            self.reset_cross_attention()
            self._cross_source = (context, context._version)
            return False
        return self.cross[0] is not None

    def memory_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.key + self.value)
        total += sum(e.key.numel() * e.key.element_size() * 2 for e in self.cross if e is not None)
        return total


def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of [B, L, H, D] keys by per-pair angles (cos, sin [D/2]), float32 math."""
    pairs = keys.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs.unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(keys.dtype)
