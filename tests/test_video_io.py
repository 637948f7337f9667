"""mp4 writing: frames come back from the file with the right count, size and colours; bad input raises."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from oneforcing.pipelines import video_io
from oneforcing.pipelines.video_io import (
    Mp4Writer, export_to_mp4, read_video_frames, to_uint8_frames, video_to_uint8,
)

BACKGROUND = np.array([0.1, 0.2, 0.6])  # RGB, bluish
SQUARE = np.array([1.0, 0.9, 0.0])  # yellow


def _clip(frames=9, h=64, w=96):
    """[T, H, W, 3] floats in 0..1: a yellow 20 x 20 square moving right by 8 pixels a frame."""
    video = np.broadcast_to(BACKGROUND, (frames, h, w, 3)).astype(np.float32)
    for t in range(frames):
        video[t, 20:40, 5 + 8 * t : 25 + 8 * t] = SQUARE
    return video


def _read(path):
    """All frames of a video file as RGB uint8 [T, H, W, 3], and its fps."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} is not a playable video"
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    ok, frame = cap.read()
    while ok:
        frames.append(frame[:, :, ::-1])
        ok, frame = cap.read()
    cap.release()
    return np.stack(frames), fps


def _assert_matches_clip(back, clip):
    expected = to_uint8_frames(clip).astype(float)
    assert back.shape == expected.shape
    assert np.abs(back.astype(float) - expected).mean() < 6  # mp4 is lossy
    for t in (0, len(clip) - 1):
        inside = back[t, 24:36, 5 + 8 * t + 4 : 5 + 8 * t + 16].reshape(-1, 3).mean(0)
        outside = back[t, 45:, :].reshape(-1, 3).mean(0)
        assert np.abs(inside - SQUARE * 255).max() < 20, (t, inside)  # the square is where it was drawn
        assert np.abs(outside - BACKGROUND * 255).max() < 12, (t, outside)


def test_written_block_by_block_reads_back(tmp_path):
    clip = _clip()
    path = tmp_path / "clip.mp4"
    with Mp4Writer(path, fps=16) as writer:
        writer.write(clip[:1])  # like a stream: 1 frame, then blocks of 4
        writer.write(to_uint8_frames(clip[1:5]))
        writer.write(torch.from_numpy(clip[5:]))
        assert writer.frames_written == 9 and writer.size == (64, 96)
    back, fps = _read(path)
    assert fps == pytest.approx(16, abs=0.01)
    _assert_matches_clip(back, clip)


def test_read_video_frames_gives_rgb_frames(tmp_path):
    frames = np.zeros((6, 32, 48, 3), dtype=np.uint8)
    frames[..., 0] = 220  # red
    path = export_to_mp4(frames, tmp_path / "red.mp4")
    read = read_video_frames(path)
    assert read.shape == (6, 32, 48, 3) and read.dtype == np.uint8
    assert read[..., 0].mean() > 180 and read[..., 2].mean() < 40  # RGB order, not OpenCV's BGR
    assert read_video_frames(path, max_frames=2).shape == (2, 32, 48, 3)
    assert read_video_frames(tmp_path / "missing.mp4").shape[0] == 0
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    assert read_video_frames(tmp_path / "junk.mp4").shape[0] == 0


def test_export_decoder_output(tmp_path):
    clip = _clip(frames=5)
    video = torch.from_numpy(clip).permute(3, 0, 1, 2)[None] * 2 - 1  # [1, 3, T, H, W] in [-1, 1]
    path = export_to_mp4(video.bfloat16(), tmp_path / "decoded.mp4", fps=8)
    back, fps = _read(path)
    assert fps == pytest.approx(8, abs=0.01)
    _assert_matches_clip(back, clip)


def test_video_to_uint8():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0, float("nan"), -0.5]).view(1, 3, 1, 1, 2)  # [B, 3, T, H, W]
    frames = video_to_uint8(video)
    assert frames.dtype == np.uint8 and frames.shape == (1, 1, 2, 3)
    assert frames[0, 0].tolist() == [[0, 255, 0], [128, 255, 64]]  # channel c of pixel w is video[0, c, 0, 0, w]
    assert np.array_equal(video_to_uint8(video.numpy()), frames)
    thwc = np.random.default_rng(0).random((3, 4, 6, 3), dtype=np.float32)
    assert np.array_equal(video_to_uint8(thwc), (thwc * 255).round().astype(np.uint8))
    as_uint8 = (thwc * 255).astype(np.uint8)
    assert np.array_equal(video_to_uint8(torch.from_numpy(as_uint8)), as_uint8)  # uint8 passes through
    with pytest.raises(ValueError, match="B = 1"):
        video_to_uint8(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video_to_uint8(np.zeros((4, 8, 8)))
    with pytest.raises(TypeError, match="uint8 or floats"):
        to_uint8_frames(np.zeros((1, 4, 4, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        to_uint8_frames([[[[0, 0, 0]]]])


def test_interrupted_streams_leave_playable_files(tmp_path):
    clip = _clip()
    # an exception (e.g. an interrupted generation) inside the with block
    path = tmp_path / "raised.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(path) as writer:
            writer.write(clip[:5])
            raise KeyboardInterrupt
    assert _read(path)[0].shape[0] == 5
    # a writer dropped without close()
    path = tmp_path / "dropped.mp4"
    writer = Mp4Writer(path)
    writer.write(clip[:3])
    del writer
    assert _read(path)[0].shape[0] == 3
    # a process that ends with an unhandled error while the writer is still referenced
    path = tmp_path / "crashed.mp4"
    script = (  # loads pipelines/ as a bare package: importing the whole package (torch, diffusers) would be slow
        "import os, sys, types\n"
        "import numpy as np\n"
        "package = types.ModuleType('bare')\n"
        "package.__path__ = [os.path.dirname(sys.argv[2])]\n"
        "sys.modules['bare'] = package\n"
        "from bare import video_io\n"
        "writer = video_io.Mp4Writer(sys.argv[1])\n"
        "writer.write(np.full((4, 32, 32, 3), 200, np.uint8))\n"
        "raise SystemExit('stream stopped')\n"
    )
    command = [sys.executable, "-c", script, str(path), video_io.__file__]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "stream stopped" in result.stderr
    back, _ = _read(path)
    assert back.shape == (4, 32, 32, 3) and abs(back.mean() - 200) < 4


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mp4Writer(tmp_path / "missing" / "x.mp4")
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        Mp4Writer(tmp_path / "file.txt" / "x.mp4")
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        Mp4Writer(tmp_path / "folder.mp4")
    with pytest.raises(ValueError, match=r"end in \.mp4"):
        Mp4Writer(tmp_path / "x.avi")
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "x.mp4", fps=0)
    # /proc takes no new files: OpenCV cannot open the writer (or, when not root, the permission check says so)
    with pytest.raises(OSError, match="/proc/x.mp4"):
        Mp4Writer("/proc/x.mp4", size=(16, 16))


def test_bad_frames(tmp_path):
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        export_to_mp4(np.zeros((4, 8, 8)), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="no frames"):
        export_to_mp4(np.zeros((0, 8, 8, 3)), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="even"):
        export_to_mp4(np.zeros((1, 63, 96, 3)), tmp_path / "x.mp4")
    with Mp4Writer(tmp_path / "y.mp4", size=(64, 96)) as writer:
        with pytest.raises(ValueError, match="differs"):
            writer.write(_clip(frames=1, h=32))
        writer.write(_clip(frames=1))
    with pytest.raises(ValueError, match="closed"):
        writer.write(_clip(frames=1))
    assert _read(tmp_path / "y.mp4")[0].shape == (1, 64, 96, 3)
