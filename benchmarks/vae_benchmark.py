"""Benchmark of streaming Wan2.1 VAE decoding, on a GPU (random weights: speed does not depend on the values) or CPU.

Decodes 81 frames at 480x832 block by block (3 latent frames per block, as the chunk-wise pipeline does) through
diffusers' own modules and through each step of ``pipelines/vae_fast.py`` (frame-wise 2-D convolutions, fused
norms, bf16 upsampling), with and without cuDNN autotuning and with ``torch.compile``; prints time, convolution
TFLOP/s, peak memory and the error against a float32 decode. ``--layers`` also times the decoder's main convolution
shapes alone.

    python benchmarks/vae_benchmark.py --layers --profile --json vae.json
    python benchmarks/vae_benchmark.py --variants diffusers+compile,fast+compile --cudnn-benchmark off
    python benchmarks/vae_benchmark.py --device cpu --vae models/oneforcing-demo/vae --height 128 --width 128 \
        --variants diffusers,fast --cudnn-benchmark off   # the demo model's VAE on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from oneforcing.pipelines.layout import latent_frame_count
from oneforcing.pipelines.vae_streaming import FULL_RESOLUTION_CHUNK
from rollout_benchmark import cuda_time, video_arguments, wall_time  # this folder is on sys.path when a script of it runs

# decoder paths: None = diffusers' own modules, else WanFastPath's arguments (each row adds to or changes PLAIN)
PLAIN = dict(conv=None, fuse_norm=False, bf16_upsample=False, subpixel_upsample=False, chunk_frames=None)
# what WanStreamingDecoder runs on a GPU
FAST = dict(conv="taps", fuse_norm=True, bf16_upsample=True, subpixel_upsample=True, chunk_frames=FULL_RESOLUTION_CHUNK)
VARIANTS = {
    "diffusers": None,
    "taps": {**PLAIN, "conv": "taps"},
    "stacked": {**PLAIN, "conv": "stacked"},
    # the fused norm alone sees channels-first activations, which the Triton kernel does not take: the compiled
    # reference runs instead (recompiling per shape), so this row measures little
    "norm": {**PLAIN, "fuse_norm": True},
    "taps+norm": {**PLAIN, "conv": "taps", "fuse_norm": True},
    "taps+norm+bf16up": {**PLAIN, "conv": "taps", "fuse_norm": True, "bf16_upsample": True},
    "taps+norm+subpixel": {**FAST, "chunk_frames": None},
    "fast": FAST,
    "fast-chunk1": {**FAST, "chunk_frames": 1},
    "fast-stacked": {**FAST, "conv": "stacked"},
}


def conv_flops(vae, run) -> float:
    """Multiply-add FLOPs (x2) of every convolution the decoder runs during ``run()``."""
    total = [0.0]

    def hook(module, inputs, output):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        total[0] += 2.0 * output.numel() * kernel * module.in_channels // module.groups

    handles = [m.register_forward_hook(hook) for m in vae.decoder.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def layer_shapes(h: int, w: int):
    """(channels, frames out, height, width) of the decoder's 3x3x3 convolutions, per latent frame decoded."""
    return [(384, 1, h, w), (384, 2, 2 * h, 2 * w), (192, 4, 4 * h, 4 * w), (96, 4, 8 * h, 8 * w)]


def time_layers(h: int, w: int) -> dict:
    """One causal 3x3x3 convolution (cache of 2 frames) of each main decoder shape, four ways."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from oneforcing.pipelines.vae_fast import _WeightCache, frame_conv

    out = {}
    for c, t, hh, ww in layer_shapes(h, w):
        conv = WanCausalConv3d(c, c, 3, padding=1).to("cuda", torch.bfloat16)
        x = torch.randn(1, c, t, hh, ww, device="cuda", dtype=torch.bfloat16)
        cache = torch.randn(1, c, 2, hh, ww, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * c * c * 27 * t * hh * ww
        row = {}
        x_cl, cache_cl = (v.contiguous(memory_format=torch.channels_last_3d) for v in (x, cache))
        conv_cl = WanCausalConv3d(c, c, 3, padding=1).to("cuda", torch.bfloat16)
        conv_cl.weight.data = conv_cl.weight.data.contiguous(memory_format=torch.channels_last_3d)
        runs = {
            "conv3d": lambda: conv(x, cache),
            "conv3d_channels_last": lambda: conv_cl(x_cl, cache_cl),
        }
        for mode in ("stacked", "taps"):
            weights = _WeightCache().get(conv, mode, torch.bfloat16)
            runs[mode] = (lambda m, wts: lambda: frame_conv(conv, x_cl, cache_cl, m, wts))(mode, weights)
        with torch.no_grad():
            for name, fn in runs.items():
                row[name + "_ms"] = round(cuda_time(fn, 3, 10) * 1e3, 3)
                row[name + "_tflops"] = round(flops / (row[name + "_ms"] / 1e3) / 1e12, 1)
        out[f"c{c}_t{t}_{hh}x{ww}"] = row
        print("layer", f"c{c}_t{t}_{hh}x{ww}", json.dumps(row), flush=True)
    return out


def profile_top(fn, cuda: bool, rows=15) -> list:
    """The kernels (CUDA) or operators (CPU) that take most of one ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()

    def spent(e):
        return e.device_time_total if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=spent, reverse=True)
    return [{"name": e.key[:90], "ms": round(spent(e) / 1e3, 2), "calls": e.count} for e in events[:rows]]


def main():
    parser = video_arguments(argparse.ArgumentParser())
    parser.add_argument("--block", type=int, default=3, help="latent frames per decoded block")
    parser.add_argument("--layers", action="store_true", help="also time single convolutions of the main shapes")
    parser.add_argument("--variants", default="diffusers,taps,stacked,norm,taps+norm,fast,fast-stacked",
                        help=f"comma list of {', '.join(VARIANTS)}, each optionally +compile (torch.compile of "
                             "the decoder)")
    parser.add_argument("--cudnn-benchmark", choices=("off", "on", "both"), default="both")
    parser.add_argument("--profile", action="store_true", help="top CUDA kernels of one decode per variant")
    parser.add_argument("--device", default="cuda", help="cuda (bf16) or cpu (float32)")
    parser.add_argument("--vae", default=None,
                        help="a diffusers AutoencoderKLWan folder (e.g. models/oneforcing-demo/vae); default: the "
                             "Wan2.1 VAE's architecture with random weights")
    args = parser.parse_args()

    from diffusers import AutoencoderKLWan

    from oneforcing.pipelines.vae_fast import WanFastPath
    from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.layers and not cuda:
        raise SystemExit("--layers needs --device cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def build_vae(dtype):
        torch.manual_seed(0)
        if args.vae:
            return AutoencoderKLWan.from_pretrained(args.vae).to(device, dtype).eval()
        with device:
            return AutoencoderKLWan().to(dtype).eval()

    latent_frames, h, w = latent_frame_count(args.frames), args.height // 8, args.width // 8
    results = {"device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "vae": args.vae or "Wan2.1 architecture, random weights",
               "dtype": str(dtype), "frames": args.frames, "size": f"{args.width}x{args.height}", "block": args.block}
    if args.layers:
        results["layers"] = time_layers(h, w)

    vae = build_vae(dtype)
    latents = torch.randn(1, vae.config.z_dim, latent_frames, h, w, device=device, dtype=dtype)

    def stream(decoder):
        def run():
            decoder.reset()
            videos = []
            with torch.no_grad():
                for s in range(0, latent_frames, args.block):
                    videos.append(decoder.decode_block(latents[:, :, s:s + args.block]))
            return videos
        return run

    flops = conv_flops(vae, stream(WanStreamingDecoder(vae, fast=False)))
    results["conv_tflop"] = round(flops / 1e12, 1)
    # float32 reference (TF32 off) for the error of every bf16 variant
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    vae32 = build_vae(torch.float32)
    vae32.load_state_dict(vae.state_dict())
    with torch.no_grad():
        reference = WanStreamingDecoder(vae32, fast=False).decode_all(latents.float())
    del vae32
    if cuda:
        torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True
    print(json.dumps(results), flush=True)

    def measure(name, decoder):
        run = stream(decoder)
        t0 = time.perf_counter()
        video = torch.cat(run(), dim=2)  # first call: includes any compile / autotuning
        sync()
        first_s = time.perf_counter() - t0
        err = (video.float() - reference).abs()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = wall_time(run, device, 1, 3)
        row = {"s": round(seconds, 4), "first_call_s": round(first_s, 2),
               "conv_tflops": round(flops / seconds / 1e12, 2), "frames_per_s": round(args.frames / seconds, 1),
               "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               "max_err_vs_fp32": round(err.max().item(), 4), "mean_err_vs_fp32": round(err.mean().item(), 5)}
        if args.profile:
            row["top_kernels"] = profile_top(run, cuda)
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)

    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.cudnn_benchmark]
    for benchmark_mode in modes:
        torch.backends.cudnn.benchmark = benchmark_mode
        for variant in args.variants.split(","):
            path = variant.removesuffix("+compile")
            compiled = path != variant
            if path not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)} (+compile)")
            name = f"{variant}{'/cudnn_benchmark' if benchmark_mode else ''}"
            fast = WanFastPath(vae.decoder, **VARIANTS[path]) if VARIANTS[path] is not None else None
            eager = vae.decoder
            if compiled:
                torch._dynamo.reset()
                vae.decoder = torch.compile(eager)  # after WanFastPath collected the eager modules
            try:
                with fast or contextlib.nullcontext():
                    measure(name, WanStreamingDecoder(vae, fast=False))
            except Exception as err:  # report and go on: whether compile copes is part of what is measured
                results[name] = f"failed: {type(err).__name__}: {str(err)[:300]}"
                print(name, results[name], flush=True)
            finally:
                vae.decoder = eager
    torch.backends.cudnn.benchmark = False
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
