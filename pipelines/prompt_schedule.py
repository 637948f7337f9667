"""Prompt schedules: which prompt drives which frames of a video (prompt switching, as in LongLive).

Frame numbers are **video frames**, 0-based, as in the output file (at 16 fps frame 80 is second 5). The model
works in latent frames and in blocks: latent frame 0 is video frame 0, latent frame ``l >= 1`` is video frames
``4l - 3 .. 4l`` (Wan VAE, temporal factor 4), and a block of ``frames_per_block`` latent frames is made with one
prompt. A switch therefore takes effect at a block start, and the rule is to **round up**: a switch asked at video
frame ``v`` starts at the first block whose first video frame is ``>= v``, so no frame before ``v`` is ever made
with the new prompt. :meth:`PromptSchedule.latent_switches` returns where each switch lands;
:func:`video_frame_of_latent` turns that back into a video frame to show the user.

With a context (an image or a clip given to continue), the generated blocks start after the context's latent frames;
a switch that lands inside the context takes effect at the first generated block.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .layout import BlockLayout, latent_frame_count, latent_frame_of_video, video_frame_count, video_frame_of_latent

__all__ = ["Prompt", "PromptRange", "PromptSchedule", "latent_frame_of_video", "video_frame_of_latent"]

Prompt = str | torch.Tensor  # text, or its embeddings [B, L, text_dim]


@dataclass(frozen=True)
class PromptRange:
    """``prompt`` drives video frames ``start .. end - 1`` (``end`` None: until the next range or the video's end).

    ``label``: how error messages name the prompt (e.g. its text, when ``prompt`` holds embeddings).
    """

    start: int
    end: int | None
    prompt: Prompt
    label: str | None = None


def _describe(prompt_range: PromptRange) -> str:
    text = prompt_range.label if prompt_range.label is not None else prompt_range.prompt
    if isinstance(text, torch.Tensor):
        return f"<embeddings {tuple(text.shape)}>"
    return repr(text if len(text) <= 40 else text[:37] + "...")


class PromptSchedule:
    """An ordered list of :class:`PromptRange` covering a video from frame 0, without gaps or overlaps.

    Args:
        ranges: :class:`PromptRange` items or ``(start, prompt)`` / ``(start, end, prompt)`` tuples or dicts with
            ``start``, optional ``end`` (exclusive) and ``prompt``; any order. An omitted ``end`` runs to the next
            range's start (or the end of the video).
    Raises:
        ValueError: empty schedule or prompt, negative or non-integer frames, first range not at frame 0, two ranges
            overlapping or leaving frames without a prompt.
    """

    def __init__(self, ranges: Iterable[PromptRange | tuple | Mapping]):
        items = [self._coerce_range(r) for r in ranges]
        if not items:
            raise ValueError("the prompt schedule is empty: give at least one prompt starting at frame 0")
        items.sort(key=lambda r: r.start)
        if items[0].start != 0:
            raise ValueError(f"the prompt schedule has a gap: frames 0..{items[0].start - 1} have no prompt "
                             "(the first prompt must start at frame 0)")
        resolved = []
        for current, following in zip(items, items[1:] + [None]):
            end = current.end
            if following is not None:
                if following.start == current.start:
                    raise ValueError(f"prompts {_describe(current)} and {_describe(following)} overlap: "
                                     f"both start at frame {current.start}")
                if end is None:
                    end = following.start
                elif end > following.start:
                    raise ValueError(
                        f"prompt ranges overlap: {_describe(current)} runs to frame {end - 1} but "
                        f"{_describe(following)} starts at frame {following.start}"
                    )
                elif end < following.start:
                    raise ValueError(
                        f"the prompt schedule has a gap: frames {end}..{following.start - 1} have no prompt "
                        f"({_describe(current)} ends at {end}, {_describe(following)} starts at "
                        f"{following.start})"
                    )
            resolved.append(PromptRange(current.start, end, current.prompt, current.label))
        self.ranges: tuple[PromptRange, ...] = tuple(resolved)

    # -- building ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _coerce_range(item) -> PromptRange:
        label = None
        if isinstance(item, PromptRange):
            start, end, prompt, label = item.start, item.end, item.prompt, item.label
        elif isinstance(item, Mapping):
            unknown = set(item) - {"start", "end", "prompt"}
            if unknown or "start" not in item or "prompt" not in item:
                raise ValueError(f"a prompt range needs keys 'start' and 'prompt' (optional 'end'), got {dict(item)}")
            start, end, prompt = item["start"], item.get("end"), item["prompt"]
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            start, end, prompt = (item[0], None, item[1]) if len(item) == 2 else item
        else:
            raise ValueError(f"a prompt range must be (start, prompt), (start, end, prompt) or a dict, got {item!r}")
        for name, value in (("start", start), ("end", end)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"prompt range {name} must be a video frame number >= 0, got {value!r}")
        if end is not None and end <= start:
            raise ValueError(f"prompt range {start}..{end} is empty: end (exclusive) must be after start")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"the prompt starting at frame {start} is empty")
        elif isinstance(prompt, torch.Tensor):
            if prompt.ndim != 3:
                raise ValueError(f"prompt embeddings at frame {start} must be [B, L, D], got {tuple(prompt.shape)}")
        else:
            raise ValueError(f"the prompt at frame {start} must be text or embeddings, got {type(prompt).__name__}")
        return PromptRange(start, end, prompt, label)

    @classmethod
    def from_switches(cls, switches: Mapping[int, Prompt]) -> "PromptSchedule":
        """``{0: "a cat", 40: "a dog"}``: each prompt from its frame to the next one's."""
        return cls([(start, prompt) for start, prompt in switches.items()])

    @classmethod
    def parse(cls, specs: Iterable[str]) -> "PromptSchedule":
        """Command-line items ``"FRAME:text"`` or ``"START-END:text"`` (END exclusive). A single item without a
        frame is the prompt of the whole video; a prompt text that itself starts with ``digits:`` needs ``0:``."""
        specs = list(specs)
        pattern = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?:(.*)$", re.DOTALL)
        if len(specs) == 1 and not pattern.match(specs[0]):
            return cls([(0, specs[0])])
        ranges = []
        for spec in specs:
            match = pattern.match(spec)
            if match is None:
                raise ValueError(f"prompt {spec!r}: with several prompts each one needs its first frame, "
                                 "as 'FRAME:text' (e.g. '0:a cat', '40:a dog')")
            start, end, text = match.groups()
            ranges.append((int(start), None if end is None else int(end), text.strip()))
        return cls(ranges)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptSchedule":
        """A JSON file (see :meth:`from_json`)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt schedule {path} does not exist") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"prompt schedule {path} is not valid JSON: {error}") from None
        return cls.from_json(text, f"prompt schedule {path}")

    @classmethod
    def from_json(cls, text: str, source: str = "prompt schedule") -> "PromptSchedule":
        """JSON text: ``[{"start": 0, "prompt": "..."}, {"start": 40, "end": 81, "prompt": "..."}]`` (what the live
        studio downloads) or ``{"0": "...", "40": "..."}``; errors start with ``source``."""
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from None
        except ValueError as error:  # a key given twice
            raise ValueError(f"{source}: {error}") from None
        try:
            if isinstance(data, dict):
                return cls.from_switches(_unique_keys([(_frame_key(k), v) for k, v in data.items()]))
            if isinstance(data, list):
                return cls(data)
            raise ValueError("expected a list of {start, end?, prompt} objects or a {frame: prompt} object")
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def coerce(cls, value: Any) -> "PromptSchedule":
        """A schedule from a :class:`PromptSchedule`, a ``{frame: prompt}`` mapping or a list of ranges."""
        if isinstance(value, PromptSchedule):
            return value
        if isinstance(value, Mapping):
            return cls.from_switches(value)
        if isinstance(value, (str, torch.Tensor)):
            return cls([(0, value)])
        return cls(value)

    # -- reading -------------------------------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[Prompt]:
        return [r.prompt for r in self.ranges]

    def prompt_at(self, frame: int) -> Prompt:
        """The prompt asked for video frame ``frame``."""
        for r in reversed(self.ranges):
            if frame >= r.start:
                return r.prompt
        raise ValueError(f"frame {frame} is before the schedule")

    def check_length(self, num_frames: int | None) -> None:
        """Every range must start inside a video of ``num_frames`` frames (None: endless) and the last must reach its
        end."""
        last = self.ranges[-1]
        if num_frames is None:
            if last.end is not None:
                raise ValueError(f"the prompt schedule ends at frame {last.end} but the stream has no end: "
                                 "leave the last range open")
            return
        for r in self.ranges:
            if r.start >= num_frames:
                raise ValueError(f"prompt switch at frame {r.start} ({_describe(r)}) is past the end of the "
                                 f"video (frames 0..{num_frames - 1})")
        if last.end is not None and last.end != num_frames:
            what = "have no prompt" if last.end < num_frames else "are past the end of the video"
            span = f"{last.end}..{num_frames - 1}" if last.end < num_frames else f"{num_frames}..{last.end - 1}"
            raise ValueError(f"the last prompt range ends at frame {last.end} but the video has {num_frames} "
                             f"frames: frames {span} {what}")

    def open_ended(self) -> "PromptSchedule":
        """This schedule with its last range left open (an endless stream's schedule must be)."""
        return PromptSchedule([*self.ranges[:-1], replace(self.ranges[-1], end=None)])

    def latent_switches(
        self,
        num_frames: int | None,
        frames_per_block: int,
        context_latent_frames: int = 0,
        temporal: int = 4,
        independent_first_frame: bool = False,
    ) -> list[tuple[int, Prompt]]:
        """:meth:`switches_in` for a video of ``num_frames`` video frames (None: endless), context included."""
        total = None if num_frames is None else latent_frame_count(num_frames, temporal)
        generated = None if total is None else max(total - context_latent_frames, 1)
        layout = BlockLayout(frames_per_block, generated, context_latent_frames, independent_first_frame)
        return self.switches_in(layout, temporal)

    def switches_in(self, layout: BlockLayout, temporal: int = 4) -> list[tuple[int, Prompt]]:
        """Where the prompts apply, in latent frames on the layout's block starts: ``[(latent frame, prompt)]``.

        The first entry is the prompt at frame 0 (latent frame 0; it also drives a context's clean pass). Each later
        switch lands on the first generated block starting at or after its frame (rounded up, see the module doc).
        Raises:
            ValueError: a switch past the end (also after rounding), or two switches landing on the same block.
        """
        total = layout.total_frames
        num_frames = None if total is None else video_frame_count(total, temporal)
        self.check_length(num_frames)
        result: list[tuple[int, Prompt]] = [(0, self.ranges[0].prompt)]
        owner = {0: self.ranges[0]}
        per_block = layout.frames_per_block
        for r in self.ranges[1:]:
            latent = layout.block_start_at_or_after(latent_frame_of_video(r.start, temporal))
            if total is not None and latent >= total:
                raise ValueError(
                    f"prompt switch at frame {r.start} ({_describe(r)}) rounds up to the block starting at "
                    f"video frame {video_frame_of_latent(latent, temporal)}, past the end of the video "
                    f"({num_frames} frames, blocks of {per_block} latent frames)"
                )
            if latent in owner and latent > 0:
                other = owner[latent]
                raise ValueError(
                    f"prompt switches at frames {other.start} and {r.start} both land on the block starting at video "
                    f"frame {video_frame_of_latent(latent, temporal)} (blocks of {per_block} latent frames = "
                    f"{per_block * temporal} video frames): space them further apart"
                )
            owner[latent] = r
            result.append((latent, r.prompt))
        return result

    def __len__(self) -> int:
        return len(self.ranges)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{r.start}..{'' if r.end is None else r.end - 1}: {_describe(r)}" for r in self.ranges
        )
        return f"PromptSchedule({parts})"


def _frame_key(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"keys must be frame numbers, got {key!r}") from None


def _unique_keys(pairs: list[tuple]) -> dict:
    """A dict of ``pairs``, refusing a key given twice (JSON keeps the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"frame {key!r} is given twice")
        out[key] = value
    return out
