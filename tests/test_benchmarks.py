"""The benchmark scripts still run against the library (their GPU-only parts are exercised on the device): the VAE
benchmark end to end on CPU with a tiny saved VAE, the rollout benchmark's FLOP count, the frame-strip tool, and the
comparison with the public reference code (when ONEFORCING_REFERENCE_ROOT names a work tree of it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_TEACHER_DIR, make_tiny_vae

from oneforcing.training import world

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_vae_benchmark_runs_on_cpu(tmp_path):
    make_tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "vae.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "vae_benchmark.py"), "--device", "cpu", "--vae", str(tmp_path / "vae"),
         "--frames", "9", "--height", "16", "--width", "24", "--variants", "diffusers,fast,stacked",
         "--cudnn-benchmark", "off", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["frames"] == 9 and result["conv_tflop"] >= 0
    for name in ("diffusers", "fast", "stacked"):
        row = result[name]
        assert row["s"] > 0 and row["frames_per_s"] > 0
        assert row["max_err_vs_fp32"] < 1e-4  # float32 on CPU: every path decodes the same video
    assert result["diffusers"]["max_err_vs_fp32"] == 0.0


def test_rollout_flops_count_every_forward():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from rollout_benchmark import WAN_1_3B, rollout_flops
    finally:
        sys.path.remove(str(BENCHMARKS))
    tokens = 1560
    gemm1, attn1 = rollout_flops(21, 1, tokens, WAN_1_3B)
    gemm3, _ = rollout_flops(21, 3, tokens, WAN_1_3B)
    dim, ffn, layers = 1536, 8960, 30
    per_token = layers * 2 * (6 * dim * dim + 2 * dim * ffn)
    # frame-wise: 21 denoising forwards + 20 clean-context passes of one frame each
    assert gemm1 == 41 * tokens * per_token
    # chunk-wise: 7 denoising forwards + 6 context passes of three frames
    assert gemm3 == 13 * 3 * tokens * per_token
    gemm4, _ = rollout_flops(21, 1, tokens, WAN_1_3B, steps_first=4)
    assert gemm4 - gemm1 == 3 * tokens * per_token
    assert attn1 > 0


REFERENCE_ROOT = os.environ.get("ONEFORCING_REFERENCE_ROOT")


@pytest.mark.skipif(not REFERENCE_ROOT, reason="set ONEFORCING_REFERENCE_ROOT to a work tree of Aurora-edu/One-Forcing")
def test_reference_compare_agrees_with_the_reference_code(tmp_path):
    """The comparison script drives the public reference pipeline and ours on the same weights and noise (tiny model,
    CPU, bfloat16: the only dtype the reference's SDPA path runs in): every variant's latents agree to bfloat16
    rounding, far below the latents' own size."""
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "reference_compare.py"), "--reference-root", REFERENCE_ROOT, "--tiny",
         "--transformer-only", "--height", "32", "--width", "32", "--repeats", "1", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["reference_attention"] == "sdpa" and result["dtype"] == "bfloat16"
    assert set(result["variants"]) == {"framewise", "framewise_first4", "chunkwise", "chunkwise_4steps"}
    for name, row in result["variants"].items():
        assert row["reference"]["transformer_s"] > 0 and row["ours"]["transformer_s"] > 0, name
        assert row["latents_mean_abs"] > 0.3, name  # real latents, not zeros
        # bfloat16 rounding (measured: mean 0.0025, max 0.012-0.02); a different function differs by the latents' size
        assert row["latents_mean_abs_diff"] < 0.01 * row["latents_mean_abs"], name
        assert row["latents_max_abs_diff"] < 0.1, name


def test_demo_diagnosis_measures_the_shipped_components_and_collects_evaluations(tmp_path):
    out = tmp_path / "diagnosis.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "demo_diagnosis.py"), "components", "--json", str(out), "--size", "5x32x32",
         "--num-prompts", "1", "--seeds", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tokenizer"]["words_split"] == []  # the shipped tokenizer keeps every caption word whole
    assert result["text_encoder"]["colour"]["token_probe"] == 1.0
    for split in ("seen", "heldout"):
        row = result["vae_round_trip"][f"5x32x32/{split}"]
        assert row["clips"] == 1 and row["ground_truth"]["colour"] == 1.0 and row["psnr_db"] > 15

    evaluation = {"settings": {"prompt_source": "seen", "seeds": [0], "num_frames": 5, "height": 32, "width": 32,
                               "device": "cpu"},
                  "models": {"t": {"spec": {"sampler": "teacher"},
                                   "summary": {"colour": {"mean": 0.5, "std": 0.1, "per_seed": [0.5]}}}}}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 3}))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "demo_diagnosis.py"), "collect", "--json", str(out),
         "--eval", f"run_seen={tmp_path / 'eval.json'}", "--summary", f"run={tmp_path / 'summary.json'}",
         "--components", f"other={out}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "vae_round_trip" in result  # kept
    assert result["evaluations"]["run_seen"]["models"]["t"]["colour"] == {"mean": 0.5, "std": 0.1}
    assert result["training_summaries"]["run"]["steps"] == 3
    assert result["other_components"]["other"]["text_encoder"]["colour"]["token_probe"] == 1.0
    assert set(result["commands"]) == {"components", "collect"}


def test_demo_diagnosis_scores_the_dmd_targets_of_the_shipped_student(tmp_path):
    """dmd-targets on the shipped student and bundled teacher, 9 frames: two prompts per split, two noise levels, two
    guidance scales. Barely noised (t = 20), the teacher's target is the student's own clip, object by object; the
    timestep shares follow the shifted distribution's closed form and the loss's clamp at 20."""
    out = tmp_path / "diagnosis.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "demo_diagnosis.py"), "dmd-targets", "--json", str(out), "--size",
         "9x128x128", "--num-prompts", "2", "--seeds", "0", "--teacher", str(DEMO_TEACHER_DIR),
         "--timesteps", "20", "900", "--guidance", "3", "6", "--shifts", "5", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["dmd_targets"]
    keys = {"student", "t=20 g=3", "t=20 g=6", "t=900 g=3", "t=900 g=6"}
    assert [row["split"] for row in result["clips"]] == ["heldout", "heldout", "seen", "seen"]
    for row in result["clips"]:
        assert set(row) >= keys
        assert all(len(row[key]["predicted"]) == len(world.parse_caption(row["prompt"]).objects) for key in keys)
        assert row["t=20 g=3"]["predicted"] == row["t=20 g=6"]["predicted"] == row["student"]["predicted"]
    assert any(shape for row in result["clips"] for shape in row["student"]["predicted"])  # objects were found
    assert set(result["summary"]["seen"]) == keys
    for shift in (5.0, 2.0):
        shares = result["timestep_shares"][str(shift)]
        assert list(shares) == ["0-20", "20-900", "900-1000"]
        assert shares["0-20"] == 0  # the DMD loss clamps t to [20, 980]
        assert sum(shares.values()) == pytest.approx(1.0)
        # P(t >= 900) = 1 - u(900) for t = s u / (1 + (s - 1) u), u uniform
        u = 0.9 / (shift - (shift - 1) * 0.9)
        assert shares["900-1000"] == pytest.approx(1 - u, abs=0.01)


def test_demo_diagnosis_measures_what_the_adversarial_head_can_tell_apart_by_noise_level(tmp_path):
    """adversarial-levels on the shipped student and the bundled teacher, 9 frames, two prompts per split. At t = 1000 a
    noised clip is its noise alone, and a real clip and the student's share their noise: the features are the same,
    nothing of their variance is real against student and the probe is at chance. Nearly clean (t = 20) they differ
    more than at t = 900."""
    out = tmp_path / "diagnosis.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "demo_diagnosis.py"), "adversarial-levels", "--json", str(out), "--size",
         "9x128x128", "--num-prompts", "2", "--seeds", "0", "--teacher", str(DEMO_TEACHER_DIR),
         "--timesteps", "20", "900", "1000", "--shifts", "5"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["adversarial_levels"]
    assert result["feature_layers"] == [3, 5] and result["clips_per_split"] == 2  # the demo recipe's head layers
    levels = result["levels"]
    assert levels["1000"]["between_fraction"] == pytest.approx(0, abs=1e-9)
    assert levels["1000"]["probe_seen_to_heldout"] == levels["1000"]["probe_heldout_to_seen"] == 0.5
    assert levels["20"]["between_fraction"] > levels["900"]["between_fraction"] > 0
    assert list(result["timestep_shares"]["5.0"]) == ["0-20", "20-900", "900-1000"]


def test_demo_scripts_parse():
    for script in ("demo_model_1gpu.sh", "demo_model_2gpu.sh", "demo_model.sh", "evaluate_demo.sh", "demo_lib.sh",
                   "demo_env.sh"):
        done = subprocess.run(["bash", "-n", str(BENCHMARKS.parent / "training" / script)], capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


def test_studio_benchmark_runs_a_short_session(tmp_path):
    """The studio benchmark against the real command for a few seconds (one prompt change, one rewind)."""
    pytest.importorskip("aiohttp")
    out = tmp_path / "studio.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "studio_benchmark.py"), "--duration", "12", "--prompts", "1",
         "--rewinds", "1", "--sample-every", "3", "--studio-args", "--height 32 --width 32", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["frames_delivered"] > 0 and not result["errors"]
    assert len(result["rss_mb"]) >= 2 and all(row["rss_mb"] > 0 for row in result["rss_mb"])


def test_memory_table_runs_every_variant_on_cpu(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "memory_table.py"), "--tiny", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("bf16", "fp8 storage", "model offload", "fp8 storage + model offload", "group offload",
                 "fp8 storage + group offload"):
        assert result[name]["frames"] == 9 and result[name]["seconds"] > 0, name


def _solid_clip(colours: list[tuple[int, int, int]], size: int = 32) -> np.ndarray:
    """uint8 frames [T, size, size, 3], frame t all of colours[t]."""
    return np.stack([np.full((size, size, 3), colour, np.uint8) for colour in colours])


def test_frame_strip_places_each_clips_frames_in_its_row_and_columns():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from frame_strip import frame_strip
    finally:
        sys.path.pop(0)
    first = _solid_clip([(10 * i, 0, 0) for i in range(6)])
    second = _solid_clip([(0, 10 * i, 0) for i in range(6)])
    strip = frame_strip([first, second], [1, 5, -1], gap=2)
    assert strip.shape == (2 * 32 + 2, 3 * 32 + 4, 3)
    assert tuple(strip[5, 5]) == (10, 0, 0) and tuple(strip[5, 34 + 5]) == (50, 0, 0)
    assert tuple(strip[34 + 5, 68 + 5]) == (0, 50, 0)
    assert tuple(strip[32, 5]) == (255, 255, 255)  # the gap between rows
    with pytest.raises(ValueError, match="no frame 6"):
        frame_strip([first], [6])
    with pytest.raises(ValueError, match="clip 1 has frames of 16x16"):
        frame_strip([first, _solid_clip([(0, 0, 0)], size=16)], [0])


def test_frame_strip_command_writes_a_png_of_mp4_frames(tmp_path):
    import cv2

    from oneforcing.pipelines.video_io import export_to_mp4

    clip = export_to_mp4(_solid_clip([(200, 40, 40)] * 3 + [(40, 40, 200)] * 2), tmp_path / "clip.mp4")
    out = tmp_path / "strip.png"
    command = [sys.executable, str(BENCHMARKS / "frame_strip.py"), str(clip), "--frames", "0", "4", "--scale", "2"]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    picture = cv2.imread(str(out))[:, :, ::-1].astype(int)
    assert picture.shape == (64, 2 * (64 + 4) - 4, 3)
    assert abs(picture[30, 30] - (200, 40, 40)).max() < 25  # mp4 is lossy: close, not equal
    assert abs(picture[30, 68 + 30] - (40, 40, 200)).max() < 25

    caption = "a white square moves right on a dark blue background"
    done = subprocess.run([*command, "--ground-truth", caption, "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    picture = cv2.imread(str(out))[:, :, ::-1].astype(int)
    assert picture.shape == (2 * (64 + 4) - 4, 2 * (64 + 4) - 4, 3)
    blue = np.array(world.BACKGROUNDS["dark blue"]) * 255
    assert abs(picture[2, 2] - blue).max() < 3  # the world's render, first row; the clip below it
    assert abs(picture[68 + 30, 30] - (200, 40, 40)).max() < 25

    for extra, message in ((["--frames", "9"], "5 frames; no frame 9"),
                           (["--ground-truth", "a plaid circle moves right on a black background"], "--ground-truth")):
        done = subprocess.run([*command[:3], *extra, "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    done = subprocess.run([*command[:2], str(tmp_path / "missing.mp4"), "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "no frames could be read" in done.stderr
    # a bad --scale is refused before any video is read
    done = subprocess.run([*command[:2], str(tmp_path / "missing.mp4"), "--scale", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--scale must be >= 1, got 0" in done.stderr
