"""Wan's 3-D rotary position embedding with a frame offset, as per-token angle tables.

Wan treats each head's D channels as D/2 adjacent pairs and gives each axis a share: height and width get D//6
pairs each, time gets the rest (22 + 21 + 21 pairs for D = 128). The angle of
pair ``k`` of an axis at position ``p`` is ``p * theta ** (-2k / d_axis)`` with ``d_axis`` the axis' channel count.
The autoregressive model needs the time positions to start at the block's first frame, which diffusers'
``WanRotaryPosEmbed`` cannot do; the tables here take a ``frame_offset``.
"""

from __future__ import annotations

import torch


class WanRotaryTables:
    """Precomputed per-axis angles; ``tables(...)`` returns (cos, sin), each [F*H*W, D/2] float32.

    Args:
        head_dim: D, channels per attention head (even).
        max_positions: rows of the per-axis tables; the time axis cannot go past it (1024 in Wan).
        theta: RoPE base.
    """

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        h_dim = w_dim = 2 * (head_dim // 6)
        t_dim = head_dim - h_dim - w_dim
        self.head_dim = head_dim
        self.max_positions = max_positions
        # explicit CPU: the tables must stay real when the model is built under a meta-device context
        positions = torch.arange(max_positions, dtype=torch.float64, device="cpu")
        self._angles = []  # per axis: [max_positions, d_axis / 2] float64
        for d in (t_dim, h_dim, w_dim):
            inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu")[: d // 2] / d)
            self._angles.append(torch.outer(positions, inv_freq))
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._time_pairs = t_dim // 2

    def time_shift(self, delta_frames: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [D/2], of a rotation that moves keys ``delta_frames`` along the time axis only.

        Rotations compose, so keys rotated at frame p and then by this table sit at frame p + delta_frames; the
        height and width pairs get the identity.
        """
        angles = torch.zeros(self.head_dim // 2, dtype=torch.float64)
        t_angles = self._angles[0]
        inv_freq = t_angles[1] if t_angles.shape[0] > 1 else torch.zeros(self._time_pairs, dtype=torch.float64)
        angles[: self._time_pairs] = delta_frames * inv_freq
        return angles.cos().float().to(device), angles.sin().float().to(device)

    def tables(
        self, frames: int, height: int, width: int, frame_offset: int = 0, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles of a token grid (frames x height x width, frame-major) whose first frame sits at ``frame_offset``."""
        key = (frames, height, width, frame_offset, str(device))
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        if frame_offset < 0 or frame_offset + frames > self.max_positions:
            raise ValueError(
                f"frames {frame_offset}..{frame_offset + frames - 1} exceed the {self.max_positions}-position rotary "
                "table; use a rolling KV cache with relative positions for longer videos"
            )
        if height > self.max_positions or width > self.max_positions:
            raise ValueError(f"token grid {height}x{width} exceeds the {self.max_positions}-position rotary table")
        t, h, w = self._angles
        grid = torch.cat(
            [
                t[frame_offset : frame_offset + frames, None, None, :].expand(frames, height, width, -1),
                h[None, :height, None, :].expand(frames, height, width, -1),
                w[None, None, :width, :].expand(frames, height, width, -1),
            ],
            dim=-1,
        ).reshape(frames * height * width, -1)
        out = (grid.cos().float().to(device), grid.sin().float().to(device))
        if len(self._memo) > 64:
            self._memo.clear()
        self._memo[key] = out
        return out
