"""Where the host time of a transformer rollout goes (GPU; Wan2.1-1.3B size, random weights).

A rollout whose GPU is often idle (``rollout_benchmark.py --busy``) is bound by the host: Python, kernel launches,
synchronisations. This profiles one rollout on CPU and GPU and prints the operators by host time, the host-device
synchronisations and copies, and the largest gaps between consecutive kernels (what ran on the host meanwhile).

    python benchmarks/launch_profile.py --json profile.json             # frame-wise, one step
    python benchmarks/launch_profile.py --first-steps 4 --json p4.json  # frame-wise, first block in 4 steps
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from oneforcing.pipelines.layout import latent_frame_count
from rollout_benchmark import build, run_rollout, video_arguments  # this folder is on sys.path when a script of it runs


def main():
    parser = video_arguments(argparse.ArgumentParser())
    parser.add_argument("--frames-per-block", type=int, default=1)
    parser.add_argument("--first-steps", type=int, default=1, help="denoising steps of the first block")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    model, scheduler = build(args)
    model.set_attention_backend("cudnn")
    latent_frames, h, w = latent_frame_count(args.frames), args.height // 8, args.width // 8
    first = None if args.first_steps == 1 else [1000 - 1000 * i // args.first_steps for i in range(args.first_steps)]

    def rollout():
        run_rollout(model, scheduler, args.frames_per_block, first, latent_frames, h, w)

    for _ in range(2):
        rollout()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rollout()
    torch.cuda.synchronize()
    plain_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False) as prof:
        rollout()
        torch.cuda.synchronize()

    events = prof.key_averages()
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "frames_per_block": args.frames_per_block,
        "first_steps": args.first_steps, "rollout_s_unprofiled": round(plain_s, 4),
        "host_ops": [{"name": e.key[:80], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
                     for e in by_host],
        "syncs_and_copies": [{"name": e.key[:80], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                              "calls": e.count} for e in events
                             if any(s in e.key for s in ("Synchronize", "Memcpy", "item", "_local_scalar_dense",
                                                         "cudaStreamWait", "cudaEventSynchronize"))],
    }
    # gaps between consecutive GPU kernels, with the host operators that were running then
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    result["kernel_s"] = round(sum(k.time_range.end - k.time_range.start for k in kernels) / 1e6, 4)
    gaps = []
    for a, b in zip(kernels, kernels[1:]):
        gap = b.time_range.start - a.time_range.end
        if gap > 0:
            gaps.append((gap, a.time_range.end, b.name))
    gaps.sort(reverse=True)
    host = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    result["gap_total_ms"] = round(sum(g for g, _, _ in gaps) / 1e3, 2)
    result["largest_gaps"] = []
    for gap, at, next_kernel in gaps[:10]:
        during = sorted({e.name[:60] for e in host if e.time_range.start <= at + gap and e.time_range.end >= at})
        result["largest_gaps"].append({"gap_ms": round(gap / 1e3, 3), "next_kernel": next_kernel[:60],
                                       "host_ops_meanwhile": during[:12]})
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
