"""Writing videos: frames to mp4 with OpenCV, appended block by block so an interrupted stream stays playable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def to_uint8_frames(frames) -> np.ndarray:
    """[T, H, W, 3] floats in 0..1 (numpy or torch) or uint8 -> uint8 [T, H, W, 3]."""
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class Mp4Writer:
    """Appends RGB frames to an mp4 file (codec mp4v).

    Each ``write`` goes to disk at once: if the process stops, the frames written so far remain a valid video once
    the file is closed, and OpenCV's writer closes the file when the object is collected.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16.0):
        self.path = Path(path)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not self.path.parent.is_dir():
            raise ValueError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self.fps = fps
        self._writer = None
        self._size = None
        self.frames_written = 0

    def write(self, frames) -> None:
        """frames: [T, H, W, 3] RGB, uint8 or floats in 0..1."""
        import cv2

        frames = to_uint8_frames(frames)
        height, width = frames.shape[1:3]
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not self._writer.isOpened():
                self._writer = None
                raise OSError(f"OpenCV could not open {self.path} for writing")
            self._size = (height, width)
        elif (height, width) != self._size:
            raise ValueError(f"frame size {height}x{width} differs from the video's {self._size[0]}x{self._size[1]}")
        for frame in frames:
            self._writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV wants BGR
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_to_mp4(frames, path: str | os.PathLike, fps: float = 16.0) -> Path:
    """Write a whole clip ([T, H, W, 3]) to ``path``."""
    with Mp4Writer(path, fps) as writer:
        writer.write(frames)
    return Path(path)
