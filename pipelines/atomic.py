"""Files and folders that appear whole or not at all: written under a temporary name beside the target, flushed to
disk, then renamed over it (a rename within one folder is atomic on POSIX file systems).

A process killed mid-write leaves the target as it was (an older file, or none) plus a temporary
``.<name>.partial-<pid><suffix>`` beside it; nothing ever reads those.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL_MARK = ".partial-"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex: the name of its content (a file rewritten in place gets a new one)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def partial_name(path: str | os.PathLike) -> Path:
    """The temporary name beside ``path`` that a write goes to first; it keeps the suffix (OpenCV picks the
    container from it) and carries the process id, so two writers never share one."""
    path = Path(path)
    return path.with_name(f".{path.stem}{PARTIAL_MARK}{os.getpid()}{path.suffix}")


def is_partial(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary name of :func:`partial_name` (an unfinished write)."""
    name = Path(path).name
    return name.startswith(".") and PARTIAL_MARK in name


def _fsync(path: Path) -> None:
    """Flush one file, or one folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Flush ``partial`` (a file, or a folder and everything in it) and rename it to ``path``, replacing what is
    there (a folder there is removed first: a crash between the two leaves no folder, never a torn one)."""
    partial, path = Path(partial), Path(path)
    written = [*partial.rglob("*"), partial] if partial.is_dir() else [partial]
    for item in written:  # so that the rename never exposes data still in the page cache
        _fsync(item)
    if partial.is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(partial, path)
    _fsync(path.parent)  # the rename itself
    return path


def discard(partial: str | os.PathLike) -> None:
    """Remove an unfinished write (file or folder), if it exists."""
    partial = Path(partial)
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)


@contextmanager
def replaced_on_success(path: str | os.PathLike) -> Iterator[Path]:
    """``with replaced_on_success(target) as partial: write(partial)``: ``target`` is replaced when the block
    succeeds; on any exception the partial write is removed and ``target`` is untouched."""
    partial = partial_name(path)
    discard(partial)
    try:
        yield partial
        publish(partial, path)
    except BaseException:
        discard(partial)
        raise
