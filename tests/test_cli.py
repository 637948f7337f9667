"""The command line writes a playable mp4 from a saved pipeline folder, and explains bad arguments."""

import subprocess
import sys

import cv2
import pytest
from conftest import make_tiny_pipeline

from oneforcing.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    make_tiny_pipeline().save_pretrained(folder)
    return folder


def test_generate_writes_mp4(tmp_path, model_dir, capsys):
    out = tmp_path / "clip.mp4"
    main(["generate", "--prompt", "a red circle moves left", "--out", str(out), "--model", str(model_dir),
          "--num-frames", "9", "--height", "32", "--width", "48", "--frames-per-block", "3", "--seed", "1"])
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 9
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (48, 32)
    assert "wrote 9 frames" in capsys.readouterr().out


def test_transformer_override_from_single_file(tmp_path, model_dir):
    from oneforcing.pipelines.loading import export_reference_checkpoint

    ckpt = export_reference_checkpoint(make_tiny_pipeline(seed=4).transformer.state_dict(), tmp_path / "of.pt")
    out = tmp_path / "clip.mp4"
    # heads cannot be read from a 64-wide checkpoint: the error must say so rather than load garbage
    with pytest.raises(ValueError, match="num_attention_heads"):
        main(["generate", "--prompt", "a cat", "--out", str(out), "--model", str(model_dir),
              "--transformer", str(ckpt), "--num-frames", "5", "--height", "32", "--width", "32"])


def test_bad_arguments(tmp_path, model_dir):
    with pytest.raises(SystemExit, match="not a folder"):
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--model", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=".mp4"):
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.gif"), "--model", str(model_dir),
              "--num-frames", "5", "--height", "32", "--width", "32"])
    with pytest.raises(ValueError, match="multiples of 16"):
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--model", str(model_dir),
              "--num-frames", "5", "--height", "30", "--width", "32"])


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "oneforcing", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--frames-per-block" in result.stdout
