"""What a studio connection has made: blocks of frames, branches of them, and the session states to rewind to.

A *take* is one video from a seed (a restart makes a new take). Its first branch grows block by block; rewinding to a
block boundary starts a new branch that shares the blocks before the boundary with its parent. The session state at a
boundary (KV cache, position, prompt, noise state and the decoder's causal memory) is kept in a
:class:`SnapshotStore`, keyed by the block that ends there (the take's ``root`` for boundary 0), so branches that
share a block share its state. Frames are kept for the mp4 download within a byte budget, the oldest dropped first.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Hashable

import numpy as np
import torch


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors and arrays in ``value`` (dataclasses, lists and tuples are walked)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name)) for f in fields(value))
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


@dataclass(eq=False)
class BlockRecord:
    """One generated block: ``frames`` uint8 [T, H, W, 3] (None once dropped from the history), video frames
    ``first_frame ..``, made under ``prompt``."""

    index: int
    first_frame: int
    frame_count: int
    prompt: str
    frames: np.ndarray | None


@dataclass(eq=False)
class Branch:
    """A video of a take: its blocks (a parent's before ``fork_frame``, its own after) and where each prompt started
    (``prompts``: (video frame, text), the first at frame 0)."""

    id: int
    parent: int | None
    fork_frame: int
    records: list[BlockRecord] = field(default_factory=list)
    prompts: list[tuple[int, str]] = field(default_factory=list)

    @property
    def frame_count(self) -> int:
        return sum(r.frame_count for r in self.records)

    def boundary_frame(self, block: int) -> int:
        """The first video frame of block ``block`` (``len(records)``: the branch's end)."""
        return sum(r.frame_count for r in self.records[:block])

    def prompt_of(self, block: int) -> str:
        """The prompt that drives block ``block`` (``len(records)``: the next block, as things stand)."""
        frame = self.boundary_frame(block)
        return [text for start, text in self.prompts if start <= frame][-1]

    def switch_prompt(self, frame: int, text: str) -> None:
        """Record that ``text`` drives the video from ``frame`` on (a later switch at the same frame replaces an
        earlier one; a switch to the prompt already in force is no switch)."""
        self.prompts = [(start, t) for start, t in self.prompts if start < frame]
        if not self.prompts or self.prompts[-1][1] != text:
            self.prompts.append((frame, text))

    def schedule(self) -> list[dict]:
        """The prompt schedule of the branch as ``oneforcing generate --prompt-schedule`` reads it: ranges of video
        frames, the last one closed at the branch's end."""
        ranges = [{"start": start, "prompt": text} for start, text in self.prompts]
        ranges[-1]["end"] = self.frame_count
        return ranges

    @property
    def first_kept_frame(self) -> int:
        """The first frame still kept (the history drops the oldest first); ``frame_count`` if none is."""
        return next((r.first_frame for r in self.records if r.frames is not None), self.frame_count)

    def kept_frames(self) -> tuple[int, np.ndarray | None]:
        """(first kept frame, uint8 [T, H, W, 3] of the kept frames from there on, or None if none are kept)."""
        kept = list(itertools.dropwhile(lambda r: r.frames is None, self.records))
        if not kept:
            return self.frame_count, None
        return kept[0].first_frame, np.concatenate([r.frames for r in kept])


class SnapshotStore:
    """Session states at block boundaries: at most ``count`` within ``budget`` bytes, the oldest dropped first (a
    single state larger than the budget is not kept)."""

    def __init__(self, count: int, budget: int):
        self.count, self.budget = count, budget
        self._states: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0

    def put(self, key: Hashable, state: Any) -> None:
        self.discard(key)
        size = tensor_bytes(state)
        self._states[key] = (state, size)
        self.bytes += size
        while self._states and (len(self._states) > self.count or self.bytes > self.budget):
            self.discard(next(iter(self._states)))

    def get(self, key: Hashable) -> Any | None:
        entry = self._states.get(key)
        return None if entry is None else entry[0]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._states

    def discard(self, key: Hashable) -> None:
        entry = self._states.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        self._states.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._states)


class Take:
    """One video from a seed: its branches, the current one, and the frames kept for download (``history_budget``
    bytes; the oldest blocks' frames are dropped first)."""

    def __init__(self, seed: int, prompt: str, history_budget: int):
        self.seed = seed
        self.root = object()  # the key of boundary 0's state
        self.branches = [Branch(0, None, 0, prompts=[(0, prompt)])]
        self.current = self.branches[0]
        self.history_budget = history_budget
        self.history_bytes = 0
        self._kept: deque[BlockRecord] = deque()

    def boundary_key(self, branch: Branch, block: int) -> Hashable:
        """The store key of the state at the start of block ``block`` of ``branch``."""
        return self.root if block == 0 else branch.records[block - 1]

    def add_block(self, record: BlockRecord) -> None:
        self.current.records.append(record)
        self._kept.append(record)
        self.history_bytes += record.frames.nbytes
        while self.history_bytes > self.history_budget and len(self._kept) > 1:
            dropped = self._kept.popleft()
            self.history_bytes -= dropped.frames.nbytes
            dropped.frames = None

    def fork(self, block: int) -> Branch:
        """A new current branch sharing the current one's blocks before ``block``."""
        parent = self.current
        frame = parent.boundary_frame(block)
        prompts = [(start, text) for start, text in parent.prompts if start < frame] or parent.prompts[:1]
        branch = Branch(len(self.branches), parent.id, frame, list(parent.records[:block]), prompts)
        self.branches.append(branch)
        self.current = branch
        return branch

    def branch(self, branch_id: int) -> Branch | None:
        return self.branches[branch_id] if 0 <= branch_id < len(self.branches) else None
