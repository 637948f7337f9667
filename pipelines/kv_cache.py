"""The explicit key/value cache of the causal rollout.

One object holds, for every transformer layer, preallocated self-attention key/value buffers for the whole video and
the cross-attention keys/values of the current prompt. Nothing is hidden in the model: the rollout creates a cache,
passes it to each forward, and decides when a block is committed.

Rules of the self-attention buffers (``L = num_frames * tokens_per_frame`` slots per layer):
- a forward of the block that starts at latent frame ``s`` and spans ``f`` frames owns the slots of frames
  ``[s, s + f)``; its queries attend to the committed frames before ``s`` plus its own tokens;
- denoising passes may use the block's own slots as scratch, but only a pass with ``commit=True`` makes the block part
  of the context: ``committed_frames`` is what later blocks see, so noisy keys never reach them;
- keys are stored already rotated with their absolute frame positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CrossAttentionEntry:
    key: torch.Tensor  # [B, Ltext, H, D]
    value: torch.Tensor  # [B, Ltext, H, D]


class KVCache:
    """Per-layer self-attention buffers [B, num_frames * tokens_per_frame, H, D] plus cross-attention keys/values.

    Args:
        num_layers, batch_size, num_frames: sizes; ``num_frames`` is the most latent frames the video may have.
        tokens_per_frame: (H / patch_h) * (W / patch_w) tokens of one latent frame.
        num_heads, head_dim: attention geometry of the transformer.
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
    ):
        if min(num_layers, batch_size, num_frames, tokens_per_frame, num_heads, head_dim) < 1:
            raise ValueError("every KV cache size must be positive")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.tokens_per_frame = tokens_per_frame
        self.num_heads = num_heads
        self.head_dim = head_dim
        shape = (batch_size, num_frames * tokens_per_frame, num_heads, head_dim)
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.cross: list[CrossAttentionEntry | None] = [None] * num_layers
        self._cross_source: tuple | None = None
        self.committed_frames = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.key[0].dtype

    @property
    def device(self) -> torch.device:
        return self.key[0].device

    def reset(self) -> None:
        """Forget the video and the prompt; the buffers are kept (no reallocation)."""
        self.committed_frames = 0
        self.reset_cross_attention()

    def reset_cross_attention(self) -> None:
        self.cross = [None] * self.num_layers
        self._cross_source = None

    # -- self-attention -------------------------------------------------------------------------------------------
    def check_block(self, start_frame: int, num_frames: int, batch_size: int, tokens_per_frame: int) -> None:
        if batch_size != self.batch_size or tokens_per_frame != self.tokens_per_frame:
            raise ValueError(
                f"KV cache was made for batch {self.batch_size} x {self.tokens_per_frame} tokens per frame, "
                f"got batch {batch_size} x {tokens_per_frame}"
            )
        if start_frame < 0 or start_frame + num_frames > self.num_frames:
            raise ValueError(
                f"block frames {start_frame}..{start_frame + num_frames - 1} do not fit the KV cache of "
                f"{self.num_frames} latent frames"
            )
        if start_frame > self.committed_frames:
            raise ValueError(
                f"block starts at frame {start_frame} but only {self.committed_frames} frames are committed: "
                "blocks must be generated in order"
            )

    def attend(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, start_frame: int, commit_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values visible to the forward: committed context before ``start_frame`` + the forward's own frames.

        The forward's first ``commit_frames`` frames are clean context being committed; the transformer lets their
        queries see only keys up to their own end (see :meth:`context_end`).

        Args:
            key, value: [B, f * tokens_per_frame, H, D] of the forward's frames (keys already rotated).
        Returns:
            two [B, (start_frame + f) * tokens_per_frame, H, D] tensors.
        """
        begin = start_frame * self.tokens_per_frame
        end = begin + key.shape[1]
        committed_end = begin + commit_frames * self.tokens_per_frame
        overwrites_context = begin < self.committed_frames * self.tokens_per_frame and commit_frames == 0
        if overwrites_context or (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)):
            # Gradient-carrying or non-committing re-runs of committed frames must not write the shared buffer.
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
        """Mark frames [start_frame, start_frame + num_frames) as clean context for later blocks."""
        self.committed_frames = max(self.committed_frames, start_frame + num_frames)

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
