"""training/demo_model_1gpu.sh from the teacher bundled in models/oneforcing-demo-training, on the CPU at a tiny size:
the README's "Retraining on one GPU" command for a fresh machine (BASE = that folder), with every stage cut to a step
or two and the clips to 9 frames of 32x32. The ODE pairs, both ODE initialisations and the student must be made from
the bundled teacher and land in the run's pack as loadable float16 models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEMO_TEACHER_DIR, REPOSITORY

from oneforcing import CausalWanTransformer3DModel

BASE = DEMO_TEACHER_DIR.parent.relative_to(REPOSITORY).as_posix()  # as the README's command names it, from the root
TEACHER = f"{BASE}/teacher"
TINY = ("encode.num_samples=2 encode.batch_size=2 encode.num_frames=9 encode.height=32 encode.width=32 "
        "ode_pairs.num_pairs=2 ode_pairs.batch_size=2 ode_pairs.num_inference_steps=2 "
        "ode_init.steps=1 ode_init.batch_size=2 distill.steps=1 distill.batch_size=1")

pytestmark = pytest.mark.skipif(not DEMO_TEACHER_DIR.is_dir(), reason="the bundled teacher is not in this checkout")


def test_ode_and_students_phases_start_from_the_bundled_teacher(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, RUN_DIR=str(run), PYTHON=sys.executable, BASE=BASE,
               PARTS="models/oneforcing-demo", STUDENTS="framewise", PHASE="ode students", EXTRA=TINY)
    done = subprocess.run(["bash", str(REPOSITORY / "training" / "demo_model_1gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    settings = json.loads((run / "framewise" / "distill" / "run_config.json").read_text())
    assert settings["distill"]["teacher"] == TEACHER
    pairs = json.loads((run / "framewise" / "ode_pairs" / "run_config.json").read_text())
    assert pairs["ode_pairs"]["teacher"] == TEACHER
    for name, frames_per_block in (("ode_init_framewise", 1), ("ode_init_chunkwise", 3), ("framewise", 1)):
        model = CausalWanTransformer3DModel.from_pretrained(run / "pack" / name)
        assert model.config.frames_per_block == frames_per_block
        assert model.config.num_layers == 6
        assert all(torch.isfinite(p).all() for p in model.parameters())
