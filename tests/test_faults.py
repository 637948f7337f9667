"""Faults, with real processes: signals during generation and during checkpoint saves, a full file system (a file-size
limit in the child), NaN weights, non-finite training. Outputs are whole or absent, never torn; every failure is an
error that names its file and cause; nothing good on disk is lost."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRANSFORMER, make_tiny_pipeline, write_random_latent_folder
from safetensors.torch import load_file, save_file

from oneforcing.pipelines.atomic import is_partial
from oneforcing.pipelines.checks import ConcurrentUseError
from oneforcing.pipelines.video_io import export_to_mp4, read_video_frames

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
SMALL = ["--height", "32", "--width", "32", "--frames-per-block", "1", "--seed", "3"]
ENDLESS = ["--num-frames", "endless", "--window-frames", "2", "--sink-frames", "1"]
# tiny models are latency-bound: one thread each is faster on a shared CPU; no .pyc writes under a file-size limit
CHILD_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults_model")
    make_tiny_pipeline().save_pretrained(folder)
    return folder


def _cli(args: list[str], cwd: Path, limit_file_size: int | None = None) -> subprocess.Popen:
    """``python -m oneforcing generate ...`` as a child process (optionally under a file-size limit)."""
    def limit():
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.Popen([sys.executable, "-m", "oneforcing", "generate", "--prompt", "a cat", *args], cwd=cwd,
                            env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 240.0) -> None:
    """Poll ``condition`` until it holds; the process is killed if it ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended early ({process.returncode}): {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out: {process.communicate()}")
        time.sleep(0.02)


def _finish(process: subprocess.Popen, timeout: float = 300.0) -> tuple[str, str]:
    """(stdout, stderr) of a child once it ends; killed if it outlives ``timeout``."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"timed out: {process.communicate()}") from None


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if is_partial(p)]


def _start_endless(tmp_path: Path, model_dir: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out.mp4"
    process = _cli(["--out", str(out), "--model", str(model_dir), *ENDLESS, *SMALL], tmp_path)
    # frames are being written (to the temporary file beside the target, which exists from the first block on)
    _wait_for(lambda: bool(_partials(tmp_path)), process)
    return process, out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_generation_finishes_a_playable_file(signum, tmp_path, model_dir):
    process, out = _start_endless(tmp_path, model_dir)
    process.send_signal(signum)
    stdout, stderr = _finish(process)
    assert process.returncode == 128 + signum, stderr
    assert f"interrupted ({signal.Signals(signum).name})" in stdout
    written = int(stdout.split("wrote ")[1].split()[0])
    assert written >= 1 and len(read_video_frames(out)) == written
    assert not _partials(tmp_path)


def test_sigkill_during_generation_keeps_the_existing_file(tmp_path, model_dir):
    out = tmp_path / "out.mp4"
    export_to_mp4(np.full((5, 32, 32, 3), 0.5, np.float32), out)
    before = read_video_frames(out)
    process, _ = _start_endless(tmp_path, model_dir)
    process.kill()
    _finish(process)
    assert process.returncode == -signal.SIGKILL
    assert np.array_equal(read_video_frames(out), before)  # untouched: the new frames went to the temporary file


def test_a_full_file_system_is_an_error_with_path_and_cause(tmp_path, model_dir):
    out = tmp_path / "out.mp4"
    export_to_mp4(np.full((5, 32, 32, 3), 0.5, np.float32), out)
    limit = 10_000  # bytes per file: far less than the video needs
    process = _cli(["--out", str(out), "--model", str(model_dir), "--num-frames", "41", "--height", "64",
                    "--width", "64", "--seed", "3"], tmp_path, limit_file_size=limit)
    stdout, stderr = _finish(process)
    assert process.returncode == 1, (stdout, stderr)
    assert f"error: cannot write {out}: the file-size limit (ulimit -f) of {limit} bytes is reached" in stderr
    assert "wrote" not in stdout
    assert len(read_video_frames(out)) == 5 and not _partials(tmp_path)  # the earlier file is intact, nothing torn is left


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, model_dir, capsys):
    from oneforcing.__main__ import main

    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["blocks.1.attn1.to_q.weight"][0, 0] = math.nan
    save_file(tensors, str(weights))
    out = tmp_path / "out.mp4"
    assert main(["generate", "--prompt", "a cat", "--out", str(out), "--model", str(broken), "--num-frames", "5",
                 *SMALL]) == 1
    err = capsys.readouterr().err
    assert "non-finite weights (NaN or Inf) in blocks.1.attn1.to_q.weight" in err and str(broken) in err
    assert not out.exists()


def test_two_threads_on_one_pipeline_get_a_clear_error():
    pipe = make_tiny_pipeline()
    started, release, results = threading.Event(), threading.Event(), {}

    def hold(pipe, index, timestep, tensors):  # the first request waits inside its first block
        started.set()
        release.wait(60)
        return {}

    def first():
        results["first"] = pipe("a cat", num_frames=9, height=32, width=32, output_type="latent",
                                callback_on_step_end=hold).frames

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60)
    try:
        with pytest.raises(ConcurrentUseError, match="already generating"):
            pipe("a dog", num_frames=5, height=32, width=32, output_type="latent")
    finally:
        release.set()
        thread.join(60)
    assert results["first"].shape[2] == 3 and torch.isfinite(results["first"]).all()


# -- training ------------------------------------------------------------------------------------------------------
@pytest.fixture
def recipe(tmp_path):
    """A latent folder and a teacher config that saves a checkpoint at every step."""
    write_random_latent_folder(tmp_path / "latents")
    config = json.loads((CONFIGS / "tiny_cpu.json").read_text())
    config.update(output_dir=str(tmp_path / "run"), data={"latents": str(tmp_path / "latents")})
    config["model"]["architecture"] = dict(TINY_TRANSFORMER)
    config["teacher"].update(steps=4, save_every=1, log_every=100, ema_decay=0.0)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(config))
    return path, tmp_path / "run" / "teacher" / "checkpoints"


def _teacher(config: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "oneforcing.training", "teacher", "--config", str(config), *overrides]
    return subprocess.Popen(command, cwd=config.parent, env=CHILD_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_during_a_checkpoint_save_resumes_from_the_last_whole_one(recipe):
    config, checkpoints = recipe
    for attempt in range(5):  # kill as soon as a save writes its training state: until one is caught mid-save
        process = _teacher(config, "teacher.steps=1000")
        _wait_for(lambda: checkpoints.is_dir() and any((p / "state.pt").exists() for p in _partials(checkpoints))
                  and len(list(checkpoints.glob("step_*"))) >= 1, process)
        process.kill()
        _finish(process)
        if _partials(checkpoints):
            break
    assert _partials(checkpoints), "no kill landed during a save"
    whole = sorted(p.name for p in checkpoints.glob("step_*"))
    resumed = _teacher(config, f"teacher.steps={int(whole[-1][5:]) + 1}")
    stdout, stderr = _finish(resumed)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {checkpoints / whole[-1]}" in stdout


def test_a_torn_newest_checkpoint_is_skipped_naming_both(recipe, capsys):
    from oneforcing.training.__main__ import main

    config, checkpoints = recipe
    main(["teacher", "--config", str(config), "teacher.steps=2"])
    # what a save cut short leaves: a temporary folder (named as older versions named it) with a truncated state ...
    torn = checkpoints / "step_0000003.tmp"
    torn.mkdir()
    (torn / "state.pt").write_bytes((checkpoints / "step_0000002" / "state.pt").read_bytes()[:100])
    # ... and a whole-looking newest folder whose state was damaged on disk
    damaged = checkpoints / "step_0000002" / "state.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    capsys.readouterr()
    main(["teacher", "--config", str(config), "teacher.steps=3"])
    out = capsys.readouterr().out
    assert f"skipping the damaged checkpoint {damaged}" in out
    assert f"resuming from {checkpoints / 'step_0000001'}" in out
    assert f"resumed from {checkpoints / 'step_0000001'} at step 1" in out
    assert sorted(p.name for p in checkpoints.glob("step_???????")) == ["step_0000002", "step_0000003"]  # rewritten
    # a checkpoint named with --resume must be readable: the error names the file
    damaged = checkpoints / "step_0000003" / "transformer" / "diffusion_pytorch_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(SystemExit, match=f"{damaged}.*truncated"):
        main(["teacher", "--config", str(config), "--resume", str(damaged.parent.parent), "teacher.steps=4"])


def test_a_non_finite_loss_stops_training_keeping_the_last_finite_checkpoint(recipe):
    from oneforcing.training.__main__ import main

    config, checkpoints = recipe
    # a learning rate that makes the weights overflow within a few steps (a checkpoint after every step)
    with pytest.raises(SystemExit, match=r"non-finite values \(NaN or Inf\) in .*; stopped without saving them. The "
                                         r"last checkpoint, .*step_\d+, holds the last finite weights"):
        main(["teacher", "--config", str(config), "teacher.steps=8", "teacher.lr=1e30", "teacher.max_grad_norm=0"])
    kept = sorted(checkpoints.glob("step_*"))
    assert kept and not _partials(checkpoints)
    for folder in kept:
        weights = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values()), folder
    assert not (checkpoints.parent / "final").exists()
