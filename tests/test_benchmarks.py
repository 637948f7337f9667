"""The benchmark scripts still run against the library (their GPU-only parts are exercised on the device): the VAE
benchmark end to end on CPU with a tiny saved VAE, and the rollout benchmark's FLOP count."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny_vae

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
