"""Bad input gets a clear error, at once, never garbage or a traceback: one row per case of issue #15 (the input and
the message it must get), for the command line, the Python API and the training commands."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline

from oneforcing import DEMO_MODEL_DIR
from oneforcing.__main__ import main
from oneforcing.pipelines.checks import ConcurrentUseError, NonFiniteError
from oneforcing.pipelines.loading import load_transformer_state_dict, to_original_names
from oneforcing.pipelines.video_io import export_to_mp4

BASE = ["--height", "32", "--width", "32", "--num-frames", "5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny pipeline folder and the files the rows name."""
    root = tmp_path_factory.mktemp("bad_input")
    make_tiny_pipeline().save_pretrained(root / "model")
    # the demo transformer as a reference checkpoint that records no config (what export wrote before #15)
    demo = load_transformer_state_dict(DEMO_MODEL_DIR / "transformer")
    torch.save({"generator_ema": {f"model.{k}": v for k, v in to_original_names(demo).items()}}, root / "bare.pt")
    export_to_mp4(np.zeros((5, 32, 32, 3), np.float32), root / "clip.mp4")
    (root / "duplicate.json").write_text('{"0": "a cat", "0": "a dog"}')
    (root / "list_model").mkdir()
    (root / "list_model" / "model_index.json").write_text("[]")
    return {"root": root, "model": root / "model"}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, what the user reads on stderr) of ``oneforcing ...``."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    if isinstance(status, str):
        status, err = 1, err + status
    return status, err


CLI_CASES = [
    # (case, arguments after `generate --prompt "a cat"` ({root}: the fixture's folder), expected message)
    ("demo transformer with no recorded head count",
     ["--model", str(DEMO_MODEL_DIR), "--transformer", "{root}/bare.pt"], "records no number of attention heads.*--num-attention-heads"),
    ("--num-frames 0 is not the default", ["--num-frames", "0"], "expected a frame count"),
    ("--height 0 is not the default", ["--height", "0"], "--height: expected a positive integer"),
    ("--seed 2**70", ["--seed", str(2**70)], "seed below 2\\*\\*64"),
    ("--keep-sink without a window", ["--keep-sink"], "--keep-sink needs a rolling cache"),
    ("--out equal to --video", ["--video", "{root}/clip.mp4", "--out", "{root}/clip.mp4"], "is the --video input"),
    ("a length past the rotary table", ["--num-frames", "4401"], "1101 latent frames exceed .* 1024-position rotary"),
    ("a size whose KV cache and decode cannot fit", ["--height", "16384", "--width", "16384"],
     "needs about .* GiB .*kv cache .* GiB are free"),
    ("a length whose latents cannot fit", ["--num-frames", "400000001", "--window-frames", "4"],
     "needs about .* GiB .*latents .* GiB are free"),
    ("a duplicate key in a prompt schedule", ["--prompt-schedule", "{root}/duplicate.json"],
     "frame '?0'? is given twice"),
    ("a JSON list as model_index.json", ["--model", "{root}/list_model"], "must hold a JSON object, got a list"),
]


@pytest.mark.parametrize("case, arguments, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line(case, arguments, message, inputs, capsys):
    root = inputs["root"]
    argv = ["generate", "--out", str(root / "out.mp4"), "--model", str(inputs["model"]), *BASE]
    argv += [a.format(root=root) for a in arguments]
    if "--prompt-schedule" not in arguments:
        argv += ["--prompt", "a cat"]
    status, err = _cli(argv, capsys)
    assert status != 0, f"{case}: exit status 0"
    last = err.strip().splitlines()[-1]  # one "error:" line (after argparse's usage for its own errors)
    assert "Traceback" not in err and "error: " in last and re.search(message, last), err
    assert not (root / "out.mp4").exists()


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def _nan_callback(pipe, index, timestep, tensors):
    return {"latents": torch.full_like(tensors["latents"], math.nan)}


API_CASES = [
    # (case, arguments of pipe(...), error type, expected message)
    ("prompt=123", {"prompt": 123}, TypeError, "prompt must be a string"),
    ("float num_frames", {"num_frames": 9.0}, ValueError, "num_frames must be an integer >= 1"),
    ("height=0 is not the default", {"height": 0}, ValueError, "height must be an integer >= 1"),
    ("max_sequence_length=0", {"max_sequence_length": 0}, ValueError, "max_sequence_length must be an integer"),
    ("num_videos_per_prompt=0", {"num_videos_per_prompt": 0}, ValueError, "num_videos_per_prompt must be"),
    ("generator=42", {"generator": 42}, TypeError, "manual_seed"),
    ("numpy prompt_embeds", {"prompt": None, "prompt_embeds": np.zeros((1, 8, 32), np.float32)}, TypeError,
     "prompt_embeds must be a torch.Tensor"),
    ("denoising_timesteps=[nan]", {"denoising_timesteps": [math.nan]}, ValueError, "finite numbers"),
    ('denoising_timesteps="1000"', {"denoising_timesteps": "1000"}, ValueError, "a list of numbers"),
    ("denoising_timesteps=[1000, 999.7]", {"denoising_timesteps": [1000, 999.7]}, ValueError,
     "decrease by at least one step"),
    ("NaN prompt_embeds", {"prompt": None, "prompt_embeds": torch.full((1, 8, 32), math.nan)}, NonFiniteError,
     "prompt_embeds holds non-finite"),
    ("Inf latents", {"latents": torch.full((1, 16, 2, 4, 4), math.inf)}, NonFiniteError, "latents holds non-finite"),
    ("NaN callback output", {"callback_on_step_end": _nan_callback}, NonFiniteError,
     "latents returned by .*callback_on_step_end"),
    ("a length past the rotary table", {"num_frames": 4401}, ValueError, "exceed the transformer's 1024-position"),
]


@pytest.mark.parametrize("case, arguments, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_python_api(case, arguments, error, message, pipe):
    call = {"prompt": "a cat", "num_frames": 5, "height": 32, "width": 32, "output_type": "latent", **arguments}
    with pytest.raises(error, match=message):
        pipe(**call)


def test_python_api_nan_weights_name_the_parameter():
    pipe = make_tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.blocks[1].ffn.net[2].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"transformer's weights .*blocks\.1\.ffn\.net\.2\.weight"):
        pipe("a cat", num_frames=5, height=32, width=32, output_type="latent")


def test_one_request_at_a_time(pipe):
    stream = pipe.stream("a cat", num_frames=9, height=32, width=32, output_type="latent")
    next(stream)  # a stream under way holds the pipeline
    with pytest.raises(ConcurrentUseError, match="already generating"):
        pipe("a dog", num_frames=5, height=32, width=32, output_type="latent")
    stream.close()  # ... until it is closed
    assert pipe("a dog", num_frames=5, height=32, width=32, output_type="latent").frames.shape[2] == 2


TRAINING_CASES = [
    # (case, config file text (None: no --config), overrides, expected message)
    ("a JSON list as training config", "[]", ["output_dir={run}"], "must hold a JSON object / TOML table, got a list"),
    ("teacher.lr=Infinity", "{}", ["output_dir={run}", "teacher.lr=Infinity"], "teacher.lr must be a finite number"),
    ("a stage without --config", None, [], "give --config FILE .* would write into runs/default/"),
]


@pytest.mark.parametrize("case, text, overrides, message", TRAINING_CASES, ids=[c[0] for c in TRAINING_CASES])
def test_training_command(case, text, overrides, message, tmp_path, monkeypatch):
    from oneforcing.training.__main__ import main as training_main

    monkeypatch.chdir(tmp_path)
    argv = ["teacher", *(o.format(run=tmp_path / "run") for o in overrides)]
    if text is not None:
        (tmp_path / "config.json").write_text(text)
        argv += ["--config", str(tmp_path / "config.json")]
    with pytest.raises(SystemExit, match=message):
        training_main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if text is None else ["config.json"])
