"""Video frames to uint8 and to mp4 files (OpenCV, codec mp4v), written block by block as a stream produces them.

An mp4 file becomes playable when its writer is closed (the container index is written last), so ``Mp4Writer``
writes to a temporary name beside the target (:func:`.atomic.partial_name`) and renames it over the target once the
file is finished and checked: the target is only ever replaced by a whole, playable file. The writer finishes its file
on ``close()``, at the end of a ``with`` block (also when an exception or ``KeyboardInterrupt`` leaves it), when it is
garbage-collected and at interpreter exit, so an interrupted stream leaves a playable file of the frames written so
far. A process killed outright (SIGKILL, power loss) leaves the target as it was and an unplayable temporary file.

OpenCV reports no write errors, so the finished file is read back: a file that does not hold every frame written (a
full disk, a file-size limit) is an ``OSError`` naming the path and the cause, and the target is left as it was.
"""

from __future__ import annotations

import math
import os
import resource
import weakref
from pathlib import Path

import numpy as np

from .atomic import discard, partial_name, publish


def _to_numpy(array, name: str):
    """numpy or torch -> numpy array (torch tensors are moved to the CPU; bf16/fp16 become float32)."""
    if hasattr(array, "detach"):  # a torch.Tensor, without importing torch here
        array = array.detach()
        if array.is_floating_point():
            array = array.float()
        return array.cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}")
    return array


def _float_to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(np.nan_to_num(frames, nan=0.0), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def to_uint8_frames(frames) -> np.ndarray:
    """Frames [T, H, W, 3] RGB, uint8 or floats in 0..1 (numpy or torch) -> uint8 [T, H, W, 3].

    Floats outside 0..1 are clipped.
    """
    frames = _to_numpy(frames, "frames")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be uint8 or floats in 0..1, got dtype {frames.dtype}")
    return _float_to_uint8(frames)


def video_to_uint8(video) -> np.ndarray:
    """A decoded video -> uint8 frames [T, H, W, 3] RGB for writing.

    Args:
        video: one of
            - [B, 3, T, H, W] floats in [-1, 1] (what ``WanStreamingDecoder`` returns), with B = 1;
            - [T, H, W, 3] floats in 0..1 or uint8.
          numpy or torch; a torch tensor is converted on its own device, so only uint8 crosses to the CPU.
    """
    if getattr(video, "ndim", None) == 5:
        if video.shape[0] != 1 or video.shape[1] != 3:
            raise ValueError(
                f"video [B, 3, T, H, W] must hold one RGB video (B = 1; pick one with video[i:i + 1]), "
                f"got shape {tuple(video.shape)}"
            )
        if hasattr(video, "detach"):
            video = ((video.detach()[0].float() + 1.0) * 127.5).nan_to_num_(0.0).clamp_(0.0, 255.0).round_()
            return video.byte().permute(1, 2, 3, 0).contiguous().cpu().numpy()
        return _float_to_uint8((_to_numpy(video, "video")[0].transpose(1, 2, 3, 0) + 1.0) / 2.0)
    if getattr(video, "ndim", None) == 4:
        return to_uint8_frames(video)
    raise ValueError(
        f"video must be [B, 3, T, H, W] in [-1, 1] or [T, H, W, 3] in 0..1, got shape {getattr(video, 'shape', None)}"
    )


def _check_output_path(path: Path) -> None:
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"cannot write {path}: the file name must end in .mp4")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}: no write permission")


class Mp4Writer:
    """Appends RGB frames to an mp4 file (codec mp4v), block by block; a context manager.

    Frames are encoded as they arrive, nothing is kept in memory. The file is opened at the first ``write`` (which
    fixes the frame size) or at once when ``size`` is given. Height and width must be even (4:2:0 chroma). Frames go
    to a temporary file beside ``path``, which replaces ``path`` when the writer is closed (see the module notes).

    Args:
        path: the ``.mp4`` file to create (replaced if it exists, once the new one is finished); its folder must exist.
        fps: frames per second (Wan2.1 models: 16).
        size: optional (height, width) to open the file now and check every block against.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16.0, size: tuple[int, int] | None = None):
        self.path = Path(path)
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        _check_output_path(self.path)
        self.fps = float(fps)
        self.size: tuple[int, int] | None = None
        self._file: _PartialMp4 | None = None
        self._finalizer = None
        self._closed = False
        if size is not None:
            self._open(*size)

    @property
    def frames_written(self) -> int:
        return self._file.frames if self._file is not None else 0

    def _open(self, height: int, width: int) -> None:
        if height <= 0 or width <= 0 or height % 2 or width % 2:
            raise ValueError(f"mp4 frames need an even, positive height and width, got {height} x {width}")
        self._file = _PartialMp4(self.path, self.fps, int(height), int(width))
        self.size = (int(height), int(width))
        # Finishes the file when this object is collected or the interpreter exits without close().
        self._finalizer = weakref.finalize(self, self._file.finish)

    def write(self, frames) -> None:
        """Append frames [T, H, W, 3] RGB: uint8, or floats in 0..1 (numpy or torch)."""
        if self._closed:
            raise ValueError(f"{self.path} is closed; open a new Mp4Writer")
        frames = to_uint8_frames(frames)
        height, width = frames.shape[1:3]
        if self._file is None:
            self._open(height, width)
        elif (height, width) != self.size:
            raise ValueError(
                f"frame size {height} x {width} differs from the video's {self.size[0]} x {self.size[1]} ({self.path})"
            )
        self._file.write(frames)

    def close(self) -> None:
        """Finish the file and move it to ``path`` (idempotent). Without ``size``, a writer that never received a
        frame creates no file. Raises ``OSError`` (path and cause) when the file could not be written whole."""
        self._closed = True
        if self._finalizer is not None:
            finalizer, self._finalizer = self._finalizer, None
            finalizer()  # finishes the file once

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PartialMp4:
    """The OpenCV writer of one temporary file, and what moves it to its target once finished and checked."""

    def __init__(self, path: Path, fps: float, height: int, width: int):
        import cv2

        self.path, self.partial, self.frames, self.done = path, partial_name(path), 0, False
        discard(self.partial)
        self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not self.writer.isOpened():
            self._fail(_out_of_room(self.partial) or f"OpenCV could not open it for writing (codec mp4v, {width} x "
                       f"{height})")

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            self.writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV takes BGR
        self.frames += len(frames)
        cause = _out_of_room(self.partial)
        if cause:  # OpenCV drops what it cannot write without a word: stop now rather than at the end
            self._fail(cause)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.writer.release()
        if self.frames == 0:
            discard(self.partial)
            return
        readable = _frames_in(self.partial)
        if readable < self.frames:  # (more: an interruption landed between a frame's write and its count)
            cause = _out_of_room(self.partial) or "the encoder did not write every frame"
            self._fail(f"{cause} (the finished file holds {readable} of {self.frames} frames)")
        publish(self.partial, self.path)

    def _fail(self, cause: str) -> None:
        self.done = True
        self.writer.release()
        discard(self.partial)
        raise OSError(f"cannot write {self.path}: {cause}; {self.path} was left as it was")


def _frames_in(path: Path) -> int:
    """The frame count an mp4 file's index gives (0 when the file cannot be opened as a video)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()


def _out_of_room(path: Path) -> str | None:
    """Why a file being written at ``path`` cannot grow (the file-size limit is reached, or its disk is full), or
    None."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = path.stat().st_size if path.exists() else 0
    if limit != resource.RLIM_INFINITY and size >= limit:
        return f"the file-size limit (ulimit -f) of {limit} bytes is reached"
    disk = os.statvfs(path.parent)
    if (disk.f_bfree if os.geteuid() == 0 else disk.f_bavail) == 0:  # root may use the reserved blocks
        return f"the disk holding {path.parent} is full"
    return None


def read_video_frames(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """The frames of a video file (the first ``max_frames`` if given) as uint8 RGB [T, H, W, 3]; T = 0 when nothing
    can be read (a missing or unplayable file)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while max_frames is None or len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def export_to_mp4(frames, path: str | os.PathLike, fps: float = 16.0) -> Path:
    """Write a whole clip to ``path``: frames [T, H, W, 3] (uint8 or 0..1) or a video [1, 3, T, H, W] in [-1, 1]."""
    frames = video_to_uint8(frames)
    if frames.shape[0] == 0:
        raise ValueError(f"no frames to write to {path}")
    with Mp4Writer(path, fps) as writer:
        writer.write(frames)
    return Path(path)
