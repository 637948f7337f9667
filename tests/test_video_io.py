"""mp4 writing: frames come back from the file with the right count, size and colours."""

import cv2
import numpy as np
import pytest

from oneforcing.pipelines.video_io import Mp4Writer, export_to_mp4, to_uint8_frames


def _clip(frames=9, h=64, w=96):
    video = np.zeros((frames, h, w, 3), dtype=np.float32)
    video[..., 2] = 0.5  # blue background
    for t in range(frames):
        video[t, 20:40, 5 + 8 * t : 25 + 8 * t, 0] = 1.0  # red square moving right
    return video


def _read(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = cap.read()
    while ok:
        frames.append(frame[:, :, ::-1])
        ok, frame = cap.read()
    return np.stack(frames)


def test_written_block_by_block_reads_back(tmp_path):
    clip = _clip()
    path = tmp_path / "clip.mp4"
    with Mp4Writer(path, fps=16) as writer:
        writer.write(clip[:1])
        writer.write(clip[1:5])
        writer.write(clip[5:])
    back = _read(path)
    assert back.shape == (9, 64, 96, 3)
    assert np.abs(back.astype(float) - to_uint8_frames(clip).astype(float)).mean() < 6
    assert back[4, 30, 5 + 8 * 4 + 10, 0] > 200 and back[4, 5, 5, 0] < 60  # the square is where it was drawn


def test_interrupted_stream_leaves_a_playable_file(tmp_path):
    path = tmp_path / "partial.mp4"
    writer = Mp4Writer(path)
    writer.write(_clip()[:5])
    writer.close()  # what happens on interruption: the context manager / collector closes the file
    assert _read(path).shape[0] == 5


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Mp4Writer(tmp_path / "missing" / "x.mp4")
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        export_to_mp4(np.zeros((4, 8, 8)), tmp_path / "x.mp4")
    with Mp4Writer(tmp_path / "y.mp4") as writer:
        writer.write(_clip(frames=1))
        with pytest.raises(ValueError, match="differs"):
            writer.write(_clip(frames=1, h=32))
