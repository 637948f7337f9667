"""training.assemble_demo: trained parts + a student transformer -> a complete pipeline folder with recorded defaults."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pipeline
from safetensors.torch import load_file

from oneforcing import OneForcingPipeline
from oneforcing.training.assemble_demo import main


@pytest.fixture
def parts(tmp_path):
    pipe = make_tiny_pipeline()
    pipe.tokenizer.save_pretrained(str(tmp_path / "parts" / "tokenizer"))
    pipe.text_encoder.save_pretrained(str(tmp_path / "parts" / "text_encoder"))
    pipe.vae.save_pretrained(str(tmp_path / "parts" / "vae"))
    pipe.transformer.save_pretrained(str(tmp_path / "student"))
    return tmp_path, pipe


def test_assembled_pipeline_loads_with_recorded_defaults_and_half_weights(parts):
    root, reference = parts
    report = main(["--parts", str(root / "parts"), "--transformer", str(root / "student"), "--out", str(root / "demo"),
                   "--num-frames", "9", "--height", "32", "--width", "48", "--max-sequence-length", "16",
                   "--frames-per-block", "3"])
    assert report["megabytes"] < 25
    weights = load_file(str(root / "demo" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    pipe = OneForcingPipeline.from_pretrained(root / "demo")
    assert pipe.config.default_video_size == {"num_frames": 9, "height": 32, "width": 48}
    assert pipe.default_max_sequence_length == 16
    assert pipe.transformer.config.frames_per_block == 3
    original = reference.transformer.state_dict()
    for name, value in pipe.transformer.state_dict().items():
        assert torch.allclose(value.float(), original[name].half().float()), name
    video = pipe("a red square", output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]
    assert video.shape == (9, 32, 48, 3)  # the recorded size is __call__'s default


def test_missing_part_and_size_limit_are_refused(parts, tmp_path):
    root, _ = parts
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
        main(["--parts", str(root / "student"), "--transformer", str(root / "student"), "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        main(["--parts", str(root / "parts"), "--transformer", str(root / "parts"), "--out", str(tmp_path / "y")])
    with pytest.raises(ValueError, match="over the 0.001 MB limit"):
        main(["--parts", str(root / "parts"), "--transformer", str(root / "student"), "--out", str(tmp_path / "z"),
              "--max-mb", "0.001"])
