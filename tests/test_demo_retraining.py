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
    """Frame-wise students alone: only the frame-wise ODE initialisation is made. The call's CALL_SECONDS leave
    1,000 s after their reserve: the distillation's own 5,000 s are cut to what is left of those when it starts, the
    ODE initialisation's 150 s fit and stay."""
    run = tmp_path / "run"
    run_script(RUN_DIR=str(run), BASE=BASE, STUDENTS="framewise", PHASE="ode students", EXTRA=TINY,
               CALL_SECONDS="100000", CALL_RESERVE="99000", DISTILL_SECONDS="5000")

    settings = json.loads((run / "framewise" / "distill" / "run_config.json").read_text())
    assert settings["distill"]["teacher"] == TEACHER
    assert 1000 - 600 < settings["distill"]["max_seconds"] < 1000  # 600: the script's own time limit in tests
    pairs = json.loads((run / "framewise" / "ode_pairs" / "run_config.json").read_text())
    assert pairs["ode_pairs"]["teacher"] == TEACHER
    ode_init = json.loads((run / "framewise" / "ode_init" / "run_config.json").read_text())
    assert ode_init["ode_init"]["max_seconds"] == 150
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


def test_a_training_stage_left_no_time_by_call_seconds_is_not_started(tmp_path):
    """CALL_SECONDS spent before the ODE initialisation: the ODE pairs (not a training stage) are made, the
    initialisation and the student are not started and say so, and the call still ends well (a later one resumes)."""
    run = tmp_path / "run"
    done = script(RUN_DIR=str(run), BASE=BASE, STUDENTS="framewise", PHASE="ode students", EXTRA=TINY,
                  CALL_SECONDS="1", CALL_RESERVE="0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("ode-init-framewise", "distill-framewise"):
        assert f"{stage} not started: CALL_SECONDS=1 leaves it no time" in done.stdout
    assert (run / "framewise" / "ode_pairs" / "run_config.json").is_file()
    assert not (run / "framewise" / "ode_init").exists()
    assert not (run / "pack" / "ode_init_framewise").exists()
    assert not (run / "pack" / "framewise").exists()


def test_an_unknown_student_stops_the_script_before_any_phase(tmp_path):
    run = tmp_path / "run"
    done = script(RUN_DIR=str(run), STUDENTS="framewise chunkwize", PHASE="ode")
    assert done.returncode == 2
    assert "unknown student chunkwize" in done.stderr
    assert not (run / "latents").exists()


def test_time_settings_that_are_not_whole_seconds_stop_the_script_before_any_phase(tmp_path):
    run = tmp_path / "run"
    done = script(RUN_DIR=str(run), STUDENTS="framewise", PHASE="ode", CALL_SECONDS="570.5")
    assert done.returncode == 2
    assert "CALL_SECONDS must be whole seconds, not 570.5" in done.stderr
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
