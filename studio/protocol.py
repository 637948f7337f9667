"""The studio's WebSocket protocol.

Page -> server: JSON text messages (control), one object each with a ``type``:

- ``{"type": "restart", "seed": int, "prompt": str}``: a new video (a new take) from ``seed``;
- ``{"type": "prompt", "text": str}``: the prompt from the next block on;
- ``{"type": "rewind", "block": int, "prompt": str?}``: back to the start of block ``block`` of the current branch,
  continued (with ``prompt`` if given) as a new branch;
- ``{"type": "select", "branch": int}``: continue an earlier branch;
- ``{"type": "pause"}`` / ``{"type": "resume"}``;
- ``{"type": "played", "branch": int, "frame": int}``: the page has shown frames up to ``frame`` (back-pressure:
  generation stays a few blocks ahead of it).

Server -> page: JSON events (``hello``, ``take``, ``branch``, ``block``, ``stats``, ``snapshots``, ``paused``,
``error`` with a ``code`` and a ``message``) and binary frames: a :data:`FRAME_HEADER` (branch id, video frame,
block index; little-endian uint32) followed by the frame as JPEG.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

FRAME_HEADER = struct.Struct("<III")
MAX_SEED = 2**64 - 1


class ControlError(ValueError):
    """A control message the server refuses; ``code`` names the kind for the page."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Control:
    """A validated control message; fields not used by its ``type`` are None."""

    type: str
    seed: int | None = None
    text: str | None = None
    block: int | None = None
    branch: int | None = None
    frame: int | None = None


# type -> {field: (kind, required)}; kind "prompt" is text checked as a prompt
FIELDS = {
    "restart": {"seed": ("seed", True), "prompt": ("prompt", True)},
    "prompt": {"text": ("prompt", True)},
    "rewind": {"block": ("count", True), "prompt": ("prompt", False)},
    "select": {"branch": ("count", True)},
    "pause": {},
    "resume": {},
    "played": {"branch": ("count", True), "frame": ("count", True)},
}


def parse_control(data: str, max_prompt_chars: int) -> Control:
    """A control message from its JSON text; raises :class:`ControlError` saying what is wrong."""
    try:
        message = json.loads(data)
    except (json.JSONDecodeError, TypeError):
        raise ControlError("bad_message", f"control messages are JSON objects; got {str(data)[:60]!r}") from None
    if not isinstance(message, dict) or message.get("type") not in FIELDS:
        kinds = ", ".join(FIELDS)
        raise ControlError("bad_message", f"a control message needs a 'type', one of {kinds}; got {str(data)[:60]!r}")
    kind, spec = message["type"], FIELDS[message["type"]]
    unknown = set(message) - set(spec) - {"type"}
    if unknown:
        raise ControlError("bad_message", f"'{kind}' takes {sorted(spec) or 'no fields'}, not {sorted(unknown)}")
    values = {}
    for name, (check, required) in spec.items():
        if name not in message:
            if required:
                raise ControlError("bad_message", f"'{kind}' needs '{name}'")
            continue
        values["text" if check == "prompt" else name] = _checked(kind, name, check, message[name], max_prompt_chars)
    return Control(kind, **values)


def _checked(kind: str, name: str, check: str, value, max_prompt_chars: int):
    if check == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise ControlError("empty_prompt", "the prompt is empty: describe what the video should show")
        if len(value) > max_prompt_chars:
            raise ControlError("prompt_too_long", f"the prompt has {len(value)} characters; at most "
                                                  f"{max_prompt_chars} are taken")
        return value.strip()
    top = MAX_SEED if check == "seed" else 2**31 - 1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ControlError("bad_message", f"'{kind}': '{name}' must be an integer 0 .. {top}, got {value!r}")
    return value


def frame_message(branch: int, frame: int, block: int, jpeg: bytes) -> bytes:
    return FRAME_HEADER.pack(branch, frame, block) + jpeg


def read_frame_message(data: bytes) -> tuple[int, int, int, bytes]:
    """(branch, video frame, block, JPEG bytes) of a binary frame message."""
    return (*FRAME_HEADER.unpack_from(data), data[FRAME_HEADER.size:])
