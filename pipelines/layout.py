"""The block layout of a video: the one owner of the frame arithmetic.

Video frames and latent frames: the Wan VAE compresses time by 4 (``temporal``), latent frame 0 is video frame 0 and
latent frame ``l >= 1`` is video frames ``4l - 3 .. 4l``, so ``n = 1 + 4k`` video frames are ``1 + k`` latent frames.

Blocks: the latent frames of a video are made (or, for a context, committed) block by block. A video may begin with
``context_frames`` clean latent frames (an encoded start image or clip) followed by the generated frames. Blocks hold
``frames_per_block`` latent frames (1 = frame-wise, 3 = chunk-wise; the last block may be shorter); with
``independent_first_frame`` (as CausVid / Self-Forcing configurations allow) latent frame 0 of the video is a block of
its own: blocks ``[1, 3, 3, ...]``. The context is split into blocks by the same rule, and the generated blocks start
right after it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Iterator

VAE_TEMPORAL_FACTOR = 4
"""Video frames per latent frame after the first (the Wan VAE's temporal stride)."""


def latent_frame_count(video_frames: int, temporal: int = VAE_TEMPORAL_FACTOR, what: str = "num_frames") -> int:
    """Latent frames of a clip of ``video_frames = 1 + temporal * k`` frames (81 -> 21); ValueError naming ``what``
    otherwise."""
    if video_frames < 1:
        raise ValueError(f"{what} must be 1 + {temporal}k (e.g. 81), got {video_frames}")
    if (video_frames - 1) % temporal:
        below = (video_frames - 1) // temporal * temporal + 1
        raise ValueError(f"{what} has {video_frames} frames; the Wan VAE encodes 1 + {temporal}k frames: use {below} "
                         f"or {below + temporal} frames")
    return (video_frames - 1) // temporal + 1


def video_frame_count(latent_frames: int, temporal: int = VAE_TEMPORAL_FACTOR) -> int:
    """Video frames decoded from ``latent_frames`` latent frames (21 -> 81; 0 -> 0)."""
    return 0 if latent_frames <= 0 else 1 + temporal * (latent_frames - 1)


def latent_frame_of_video(frame: int, temporal: int = VAE_TEMPORAL_FACTOR) -> int:
    """The first latent frame whose video frames all come at or after video frame ``frame``."""
    return 0 if frame <= 0 else (frame - 2) // temporal + 2


def video_frame_of_latent(latent_frame: int, temporal: int = VAE_TEMPORAL_FACTOR) -> int:
    """First video frame made from latent frame ``latent_frame`` (0 -> 0, l -> 4l - 3)."""
    return 0 if latent_frame <= 0 else temporal * (latent_frame - 1) + 1


@dataclass(frozen=True)
class Block:
    """One block of the generated video: latent frames ``start .. start + size - 1`` (counted from the video's start,
    context included); ``index`` counts generated blocks from 0."""

    index: int
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class BlockLayout:
    """How a video's latent frames fall into blocks.

    Args:
        frames_per_block: latent frames per block (1 = frame-wise, 3 = chunk-wise).
        num_frames: latent frames to generate, after the context (None: without end, a stream).
        context_frames: clean latent frames committed first (an encoded start image or clip).
        independent_first_frame: latent frame 0 of the video is a block of its own (blocks ``[1, 3, 3, ...]``).
    """

    frames_per_block: int = 1
    num_frames: int | None = None
    context_frames: int = 0
    independent_first_frame: bool = False

    def __post_init__(self):
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"need at least one latent frame to generate, got {self.num_frames}")
        if self.context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {self.context_frames}")

    @classmethod
    def for_video(cls, video_frames: int | None, frames_per_block: int, context_frames: int = 0,
                  independent_first_frame: bool = False, temporal: int = VAE_TEMPORAL_FACTOR) -> "BlockLayout":
        """The layout of a video of ``video_frames`` frames (1 + 4k, the context's included; None: endless)."""
        if video_frames is None:
            return cls(frames_per_block, None, context_frames, independent_first_frame)
        total = latent_frame_count(video_frames, temporal)
        if total <= context_frames:
            raise ValueError(
                f"num_frames={video_frames} leaves nothing to generate after the context's "
                f"{video_frame_count(context_frames, temporal)} frames: num_frames counts the whole video, context "
                "included"
            )
        return cls(frames_per_block, total - context_frames, context_frames, independent_first_frame)

    # -- sizes ---------------------------------------------------------------------------------------------------------
    @property
    def endless(self) -> bool:
        return self.num_frames is None

    @property
    def total_frames(self) -> int | None:
        """Latent frames of the whole video, context included (None: endless)."""
        return None if self.num_frames is None else self.context_frames + self.num_frames

    @property
    def first_block_frames(self) -> int:
        """Size of the block holding latent frame 0 of the video."""
        return 1 if self.independent_first_frame else self.frames_per_block

    def split(self, first: int, count: int) -> list[int]:
        """Block sizes of ``count`` latent frames starting at video latent frame ``first`` (how a context of
        ``count`` frames is committed)."""
        if count < 1:
            return []
        return [block.size for block in replace(self, num_frames=count, context_frames=first).blocks()]

    def block_sizes(self) -> list[int]:
        """Sizes of the generated blocks (finite layouts)."""
        if self.num_frames is None:
            raise ValueError("an endless layout has no list of block sizes")
        return [block.size for block in self.blocks()]

    @property
    def num_blocks(self) -> int | None:
        return None if self.num_frames is None else len(self.block_sizes())

    def first_block(self) -> Block:
        """The first generated block."""
        lone = self.independent_first_frame and self.context_frames == 0
        size = 1 if lone else self.frames_per_block
        return Block(0, self.context_frames, size if self.num_frames is None else min(size, self.num_frames))

    def block_after(self, block: Block) -> Block | None:
        """The generated block after ``block`` (None: ``block`` ends the video)."""
        total = self.total_frames
        if total is not None and block.end >= total:
            return None
        size = self.frames_per_block if total is None else min(self.frames_per_block, total - block.end)
        return Block(block.index + 1, block.end, size)

    def blocks(self) -> Iterator[Block]:
        """The generated blocks in order (without end for an endless layout)."""
        block = self.first_block()
        while block is not None:
            yield block
            block = self.block_after(block)

    def cache_frames(self, commit_last_block: bool = False) -> int:
        """Latent frames a full KV cache must hold: the context and every generated block but the last, which no
        later block attends to (unless it is committed to continue the video afterwards); at least 1."""
        if self.num_frames is None:
            raise ValueError("an endless video needs a rolling KV cache (a window), not a full one")
        last = 0 if commit_last_block else self.block_sizes()[-1]
        return max(self.context_frames + self.num_frames - last, 1)

    # -- block starts --------------------------------------------------------------------------------------------------
    def is_block_start(self, frame: int) -> bool:
        """Whether a generated block starts at latent frame ``frame``."""
        if frame < self.context_frames or (self.total_frames is not None and frame >= self.total_frames):
            return False
        return frame == self.block_start_at_or_after(frame)

    def block_start_at_or_after(self, frame: int) -> int:
        """The first generated block start at or after latent frame ``frame`` (may be past a finite video's end)."""
        first = self.context_frames
        if frame <= first:
            return first
        if self.independent_first_frame and first == 0:
            first = 1  # blocks of frames_per_block follow the lone first frame
        return first + -(-(frame - first) // self.frames_per_block) * self.frames_per_block

    def check_switch(self, frame: int) -> None:
        """A prompt switch must land on a generated block start."""
        first = self.context_frames
        if frame < first:
            raise ValueError(
                f"prompt switch at latent frame {frame} falls inside the committed context (frames 0..{first - 1}); "
                f"switches apply from frame {first}, the first generated block"
            )
        if self.total_frames is not None and frame >= self.total_frames:
            raise ValueError(
                f"prompt switch at latent frame {frame} is past the end of the video ({self.total_frames} latent "
                "frames)"
            )
        if not self.is_block_start(frame):
            starts = [b.start for b in itertools.islice(self.blocks(), 3)]
            raise ValueError(
                f"prompt switch at latent frame {frame} is not a block start (blocks of {self.frames_per_block} "
                f"frames start at {', '.join(map(str, starts))}, ...)"
            )
