"""training/demo_model_1gpu.sh from the teacher bundled in models/oneforcing-demo-training, on the CPU at a tiny size:
the README's "Retraining on one GPU" commands for a fresh machine, with every stage cut to a step or two and the clips
to 9 frames of 32x32. From the bundled teacher (BASE = that folder), the ODE pairs, the ODE initialisation of each
layout the chosen students need, and the students must land in the run's pack as loadable float16 models; the teacher
continued from it (teacher.init) must be evaluated, and evaluated again by a later call on the same machine with other
seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEMO_TEACHER_DIR, DEMO_TRAINING_DIR, REPOSITORY

from oneforcing import CausalWanTransformer3DModel

BASE = DEMO_TRAINING_DIR.relative_to(REPOSITORY).as_posix()  # as the README's command names it, from the root
TEACHER = DEMO_TEACHER_DIR.relative_to(REPOSITORY).as_posix()
TINY = ("encode.num_samples=2 encode.batch_size=2 encode.num_frames=9 encode.height=32 encode.width=32 "
        "teacher.batch_size=2 "
        "ode_pairs.num_pairs=2 ode_pairs.batch_size=2 ode_pairs.num_inference_steps=2 "
        "ode_init.steps=1 ode_init.batch_size=2 distill.steps=1 distill.batch_size=1")

pytestmark = pytest.mark.skipif(not DEMO_TEACHER_DIR.is_dir(), reason="the bundled teacher is not in this checkout")


def script(**settings: str) -> subprocess.CompletedProcess:
    """training/demo_model_1gpu.sh with these environment settings (PARTS: the demo's), run to its end."""
    env = dict(os.environ, PYTHON=sys.executable, PARTS="models/oneforcing-demo", **settings)
    return subprocess.run(["bash", str(REPOSITORY / "training" / "demo_model_1gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=600)


def run_script(**settings: str) -> None:
    """:func:`script`, which must succeed."""
    done = script(**settings)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def packed_model(run, name: str) -> CausalWanTransformer3DModel:
    """The run's pack's model ``name``, loaded; its weights must be finite."""
    model = CausalWanTransformer3DModel.from_pretrained(run / "pack" / name)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


def test_ode_and_students_phases_start_from_the_bundled_teacher(tmp_path):
    """Frame-wise students alone: only the frame-wise ODE initialisation is made."""
    run = tmp_path / "run"
    run_script(RUN_DIR=str(run), BASE=BASE, STUDENTS="framewise", PHASE="ode students", EXTRA=TINY)

    settings = json.loads((run / "framewise" / "distill" / "run_config.json").read_text())
    assert settings["distill"]["teacher"] == TEACHER
    pairs = json.loads((run / "framewise" / "ode_pairs" / "run_config.json").read_text())
    assert pairs["ode_pairs"]["teacher"] == TEACHER
    for name in ("ode_init_framewise", "framewise"):
        model = packed_model(run, name)
        assert model.config.frames_per_block == 1
        assert model.config.num_layers == 6
    assert not (run / "pack" / "ode_init_chunkwise").exists()
    assert not (run / "chunkwise").exists()


def test_chunkwise_student_gets_its_own_ode_initialisation(tmp_path):
    run = tmp_path / "run"
    run_script(RUN_DIR=str(run), BASE=BASE, STUDENTS="chunkwise", PHASE="ode", EXTRA=TINY)
    assert packed_model(run, "ode_init_chunkwise").config.frames_per_block == 3
    assert not (run / "pack" / "ode_init_framewise").exists()


def test_an_unknown_student_stops_the_script_before_any_phase(tmp_path):
    run = tmp_path / "run"
    done = script(RUN_DIR=str(run), STUDENTS="framewise chunkwize", PHASE="ode")
    assert done.returncode == 2
    assert "unknown student chunkwize" in done.stderr
    assert not (run / "latents").exists()


def test_teacher_phase_continues_the_bundled_teacher_and_evaluates_again_with_other_seeds(tmp_path):
    """A second call on the same machine asks for more seeds: it gets its own tables instead of a refusal to resume
    tables made with other seeds, and the first call's tables stay."""
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    common = dict(RUN_DIR=str(run), OUT=str(out), PHASE="teacher", NUM_SAMPLES="2", TEACHER_STEPS="2",
                  EVAL_PROMPTS="1", FRAMES="9", SIZE="32", WORKERS="0", EXTRA=f"teacher.init={TEACHER} {TINY}")
    run_script(EVAL_SEEDS="0", **common)
    run_script(EVAL_SEEDS="0 1", **common)

    settings = json.loads((run / "teacher" / "run_config.json").read_text())
    assert settings["teacher"]["init"] == TEACHER
    for split in ("quality.json", "quality_seen.json"):
        assert json.loads((out / "eval" / split).read_text())["settings"]["seeds"] == [0, 1]
        first = json.loads((run / "eval" / "seeds_0" / split).read_text())
        assert first["settings"]["seeds"] == [0] and "teacher" in first["models"]
    packed_model(run, "teacher")
