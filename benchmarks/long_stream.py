"""GPU stream far past the 81-frame training length with a rolling KV cache (sink + window, relative positions).

Prints frames/s and peak GPU memory over time; both should stay flat.

    python benchmarks/long_stream.py --frames 5001 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from oneforcing.pipelines.layout import latent_frame_count

from rollout_benchmark import WAN_1_3B, build_vae


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=5001, help="video frames (1 + 4k)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--sink-frames", type=int, default=3)
    parser.add_argument("--window-frames", type=int, default=12)
    parser.add_argument("--report-every", type=int, default=100, help="blocks between reports")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from oneforcing import CausalWanTransformer3DModel, OneForcingScheduler, causal_rollout
    from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalWanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
    model.set_attention_backend("cudnn")
    vae = build_vae()
    latent_frames = latent_frame_count(args.frames)
    h, w = args.height // 8, args.width // 8
    cache = model.new_kv_cache(1, latent_frames, h, w, window_frames=args.window_frames,
                               sink_frames=args.sink_frames, relative_positions=True)
    gen = torch.Generator("cuda").manual_seed(0)
    noise = torch.randn(1, 16, latent_frames, h, w, device="cuda", generator=gen)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    decoder = WanStreamingDecoder(vae)
    reports, frames, window_frames = [], 0, 0
    torch.cuda.synchronize()
    start = last = time.perf_counter()
    with torch.no_grad():
        for block in causal_rollout(model, OneForcingScheduler(), noise, text, kv_cache=cache, generator=gen,
                                    frames_per_block=args.frames_per_block):
            video = decoder.decode_block(block.latents.to(torch.bfloat16))
            frames += video.shape[2]
            window_frames += video.shape[2]
            if (block.index + 1) % args.report_every == 0:
                torch.cuda.synchronize()
                now = time.perf_counter()
                report = {"block": block.index + 1, "frames": frames, "frames_per_s": round(window_frames / (now - last), 2),
                          "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                          "allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 3),
                          "kv_cache_gb": round(cache.memory_bytes() / 2**30, 3)}
                reports.append(report)
                print(json.dumps(report), flush=True)
                torch.cuda.reset_peak_memory_stats()
                last, window_frames = now, 0
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    summary = {"gpu": torch.cuda.get_device_name(), "frames": frames, "seconds": round(total, 1),
               "frames_per_s": round(frames / total, 2), "evicted_latent_frames": cache.evicted_frames,
               "sink_frames": args.sink_frames, "window_frames": args.window_frames, "reports": reports}
    print(json.dumps({k: v for k, v in summary.items() if k != "reports"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
