"""Where the peak GPU memory of an end-to-end rollout goes (GPU; Wan2.1-1.3B transformer and VAE, random weights).

Runs the rollout of ``rollout_benchmark.py`` with the streaming Wan VAE decode twice. The first run finds the module
call after which the most memory is allocated; the second stops there and groups the live allocations by the line of
code that made them (PyTorch's allocator history). Beside it, what stays allocated between blocks is accounted for
directly: weights, the KV cache, the VAE's causal-convolution cache, everything else.

    python benchmarks/memory_profile.py --frames-per-block 3 --json memory.json
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from oneforcing.pipelines.layout import latent_frame_count
from rollout_benchmark import build, build_vae, run_rollout, video_arguments  # this folder is on sys.path

GB = 2**30


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame of the project, diffusers or torch.nn that made an allocation."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(part in name for part in ("oneforcing", "/pipelines/", "/kernels/", "/benchmarks/", "diffusers")):
            return f"{name.split('/')[-1]}:{frame.get('line')} {frame.get('name')}"
    return "other"


def main():
    parser = video_arguments(argparse.ArgumentParser())
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()

    from oneforcing.pipelines.layout import BlockLayout
    from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

    model, scheduler = build(args)
    model.set_attention_backend("cudnn")
    vae = build_vae()
    latent_frames, h, w = latent_frame_count(args.frames), args.height // 8, args.width // 8
    fpb = args.frames_per_block
    cache = model.new_kv_cache(1, BlockLayout(fpb, latent_frames).cache_frames(), h, w)
    decoders = []

    def make_decoder():
        decoders[:] = [WanStreamingDecoder(vae)]  # the last run's decoder (and its cache) goes
        return decoders[0]

    def rollout():
        run_rollout(model, scheduler, fpb, None, latent_frames, h, w, make_decoder=make_decoder, cache=cache)

    rollout()  # lazy set-up (weight reshapes, cuDNN plans) out of the way
    modules = [(f"transformer.{n}", m) for n, m in model.named_modules()]
    modules += [(f"vae.decoder.{n}", m) for n, m in vae.decoder.named_modules()]
    calls = collections.Counter()
    peak = {"bytes": 0, "at": None}
    stop = {"at": None, "snapshot": None}

    def probe(name):
        def hook(module, inputs, output):
            calls[name] += 1
            allocated = torch.cuda.memory_allocated()
            if stop["at"] is None and allocated > peak["bytes"]:
                peak.update(bytes=allocated, at=(name, calls[name]))
            if stop["at"] == (name, calls[name]):
                stop["snapshot"] = torch.cuda.memory._snapshot()
        return hook

    handles = [m.register_forward_hook(probe(n)) for n, m in modules]
    torch.cuda.reset_peak_memory_stats()
    rollout()
    max_allocated = torch.cuda.max_memory_allocated()
    # between blocks, after the run: what stays
    decoder = decoders[-1]
    fast = decoder._fast_path
    fast_weights = [t for cache in fast.weight_caches for t in cache.weights] if fast is not None else []
    persistent = {
        "transformer_weights": tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()),
        "vae_weights": tensor_bytes(vae.parameters()) + tensor_bytes(vae.buffers()),
        "kv_cache": cache.memory_bytes(),
        "vae_causal_cache": tensor_bytes(x for x in decoder._state if isinstance(x, torch.Tensor)),
        "vae_fast_path_weights": tensor_bytes(fast_weights),
        "rotary_tables": tensor_bytes(t for pair in model.rotary._memo.values() for t in pair),
    }
    persistent["total_allocated"] = torch.cuda.memory_allocated()
    known = sum(v for k, v in persistent.items() if k != "total_allocated")
    persistent["other"] = persistent["total_allocated"] - known

    del decoder, fast, fast_weights  # the third run must see only what a run holds
    found = dict(peak)
    calls.clear()
    stop["at"] = found["at"]
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    rollout()
    torch.cuda.memory._record_memory_history(enabled=None)
    for handle in handles:
        handle.remove()
    sites = collections.Counter()
    for segment in stop["snapshot"]["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                sites[allocation_site(block.get("frames", []))] += block["size"]
    result = {
        "gpu": torch.cuda.get_device_name(), "frames_per_block": fpb, "frames": args.frames,
        "size": f"{args.width}x{args.height}",
        "max_allocated_gb": round(max_allocated / GB, 3),
        "peak_after_module_call": {"module": found["at"][0], "call": found["at"][1],
                                   "gb": round(found["bytes"] / GB, 3)},
        "between_blocks_gb": {k: round(v / GB, 3) for k, v in persistent.items()},
        "live_at_peak_by_site_gb": {k: round(v / GB, 3) for k, v in sites.most_common(args.rows)},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
