"""Downloads of a studio branch: the mp4 of its frames (prompts in the file's metadata) and its prompt schedule.

The schedule is the JSON ``oneforcing generate --prompt-schedule`` reads: a list of ``{"start", "prompt"}`` ranges in
video frames, the last one closed (``"end"``) at the branch's length. The studio generates as an endless stream does
(block-by-block noise, rolling KV cache), so the command that reproduces a branch is ``--num-frames endless`` with
that schedule: an endless run stops where a closed schedule ends (:func:`reproduce_command`).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..pipelines.video_io import Mp4Writer

_BOX = struct.Struct(">I4s")


def reproduce_command(seed: int, height: int, width: int, settings_flags: list[str]) -> str:
    """The ``oneforcing generate`` command line that makes a branch again from its schedule file."""
    flags = " ".join(["--num-frames endless", f"--seed {seed}", f"--height {height}", f"--width {width}",
                      *settings_flags])
    return f"oneforcing generate --prompt-schedule schedule.json {flags} --out branch.mp4"


def schedule_json(schedule: list[dict]) -> bytes:
    return (json.dumps(schedule, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def branch_mp4(frames: np.ndarray, fps: float, comment: str) -> bytes:
    """An mp4 (the project's :class:`Mp4Writer`, codec mp4v) of uint8 frames [T, H, W, 3] with ``comment`` in its
    metadata (``moov/udta/meta/ilst/©cmt``, what ffmpeg shows as ``comment``)."""
    with tempfile.TemporaryDirectory(prefix="oneforcing-studio-") as folder:
        path = Path(folder) / "branch.mp4"
        with Mp4Writer(path, fps=fps) as writer:
            writer.write(frames)
        return with_comment(path.read_bytes(), comment)


def _box(kind: bytes, payload: bytes) -> bytes:
    return _BOX.pack(_BOX.size + len(payload), kind) + payload


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """The boxes at one level: [(type, payload)]."""
    out, offset = [], 0
    while offset + _BOX.size <= len(data):
        size, kind = _BOX.unpack_from(data, offset)
        if size < _BOX.size or offset + size > len(data):
            raise ValueError(f"not an mp4 this writer understands: box {kind!r} at {offset} has size {size}")
        out.append((kind, data[offset + _BOX.size: offset + size]))
        offset += size
    return out


COMMENT_TAG = "©cmt".encode("latin-1")


def _comment_meta(text: str) -> bytes:
    """A ``meta`` box (iTunes-style item list, as ffmpeg writes) holding ``text`` as the comment."""
    data = _box(b"data", struct.pack(">II", 1, 0) + text.encode("utf-8"))  # type 1: UTF-8, locale 0
    hdlr = _box(b"hdlr", bytes(8) + b"mdir" + b"appl" + bytes(9))
    return _box(b"meta", bytes(4) + hdlr + _box(b"ilst", _box(COMMENT_TAG, data)))  # meta is a full box: 4 bytes


def _without(boxes: list[tuple[bytes, bytes]], kind: bytes) -> bytes:
    return b"".join(_box(k, p) for k, p in boxes if k != kind)


def _child(payload: bytes, kind: bytes) -> bytes:
    """The payload of the first ``kind`` box in ``payload`` (empty if there is none)."""
    return next((p for k, p in _boxes(payload) if k == kind), b"")


def with_comment(mp4: bytes, text: str) -> bytes:
    """``mp4`` with ``text`` as its comment (replacing one written before). The movie box must come after the media
    data (as OpenCV writes it), so growing it moves no sample."""
    top = _boxes(mp4)
    if not top or top[-1][0] != b"moov":
        raise ValueError("the mp4's movie box (moov) is not at its end; cannot add metadata without moving samples")
    moov = _boxes(top[-1][1])
    udta = _without(_boxes(_child(top[-1][1], b"udta")), b"meta") + _comment_meta(text)
    return _without(top, b"moov") + _box(b"moov", _without(moov, b"udta") + _box(b"udta", udta))


def read_comment(mp4: bytes) -> str | None:
    """The comment :func:`with_comment` wrote, or None."""
    meta = _child(_child(_child(mp4, b"moov"), b"udta"), b"meta")
    data = _child(_child(_child(meta[4:], b"ilst"), COMMENT_TAG), b"data")
    return data[8:].decode("utf-8") if data else None
