"""GPU benchmark of the one-step causal rollout at Wan2.1-1.3B size (random weights: speed does not depend on values).

Prints, for frame-wise and chunk-wise rollouts of 81 frames at 480x832: transformer time, VAE time, end-to-end
frames/s, time to the first decoded frame, peak GPU memory, and the transformer's fraction of a roofline built from
GEMM and attention ceilings measured in the same run; plus diffusers' ``WanTransformer3DModel`` on the same chunk.

    python benchmarks/rollout_benchmark.py --json results.json
    python benchmarks/rollout_benchmark.py --decoder tiny --json tiny.json   # end to end with a tiny TAEHV decoder
    python benchmarks/rollout_benchmark.py --tiny-vae --json vae.json   # only: Wan VAE vs tiny TAEHV decode
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time

import torch
import torch.nn.functional as F

from oneforcing.pipelines.layout import latent_frame_count, video_frame_count

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
)


def cuda_time(fn, warmup=2, repeat=5) -> float:
    """Median seconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


# -- ceilings -------------------------------------------------------------------------------------------------------
def gemm_ceiling(tokens: int, dim: int, ffn: int) -> float:
    """TFLOP/s of the transformer's own linear shapes at this token count (bf16)."""
    shapes = [(tokens, dim, dim), (tokens, dim, ffn), (tokens, ffn, dim)]
    flops = total = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t = cuda_time(lambda: F.linear(a, w), warmup=3, repeat=10)
        flops += 2 * m * k * n
        total += t
    return flops / total / 1e12


def attention_ceiling(q_tokens: int, kv_tokens: int, heads: int, head_dim: int, backend) -> float:
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, heads, q_tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, kv_tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def run():
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q, k, v)

    t = cuda_time(run, warmup=3, repeat=10)
    return 4 * q_tokens * kv_tokens * heads * head_dim / t / 1e12


def rollout_flops(num_frames, frames_per_block, tokens_per_frame, cfg, steps_first=1, steps=1, text_len=512):
    """(GEMM FLOPs, attention FLOPs) of a rollout: every denoising step + the clean-context pass of all but the last
    block, cross-attention keys/values computed once."""
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers, ffn = cfg["num_layers"], cfg["ffn_dim"]
    gemm = attn = 0.0
    start = 0
    blocks = list(range(0, num_frames, frames_per_block))
    for i, s in enumerate(blocks):
        f = min(frames_per_block, num_frames - s)
        n = f * tokens_per_frame
        forwards = (steps_first if i == 0 else steps) + (1 if i + 1 < len(blocks) else 0)
        kv = (s + f) * tokens_per_frame
        per_forward_gemm = layers * 2 * n * (6 * dim * dim + 2 * dim * ffn)
        per_forward_attn = layers * 4 * n * dim * (kv + text_len)
        gemm += forwards * per_forward_gemm
        attn += forwards * per_forward_attn
        start += f
    return gemm, attn


# -- the measured runs ----------------------------------------------------------------------------------------------
def build(args):
    from oneforcing import CausalWanTransformer3DModel, OneForcingScheduler

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalWanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
    return model, OneForcingScheduler()


def build_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoencoderKLWan().to(torch.bfloat16).eval()  # Wan2.1 VAE config (random weights)


def run_rollout(model, scheduler, frames_per_block, first_steps, latent_frames, h, w, make_decoder=None,
                on_frames=None, fuse=True, overlap=False, cache=None):
    """One rollout; with ``make_decoder`` (() -> a streaming decoder) each block is decoded as soon as it exists,
    with ``overlap`` on a second CUDA stream, so that block i's decode runs beside block i+1's transformer passes.
    ``cache``: a KV cache to reuse (reset first; CUDA graphs need the same one every time), else the rollout's own."""
    from oneforcing import causal_rollout
    from oneforcing.pipelines.decode_overlap import SideStreamDecoder

    gen = torch.Generator("cuda").manual_seed(0)
    noise = torch.randn(1, 16, latent_frames, h, w, device="cuda", generator=gen)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    decoder = make_decoder() if make_decoder is not None else None
    if cache is not None:
        cache.reset()
    with torch.no_grad():
        blocks = causal_rollout(model, scheduler, noise, text, frames_per_block=frames_per_block,
                                first_block_timesteps=first_steps, generator=gen, fuse_context_pass=fuse,
                                kv_cache=cache)
        if decoder is None:
            for _ in blocks:
                pass
            return
        latents = ((block.index, block.latents.to(torch.bfloat16)) for block in blocks)
        if overlap:  # what OneForcingPipeline.__call__ does on CUDA
            videos = SideStreamDecoder(decoder, "cuda").decode(latents)
        else:
            videos = ((index, decoder.decode_block(block)) for index, block in latents)
        for _, video in videos:
            if on_frames is not None:
                on_frames(video)


def kv_cache_bytes(model, latent_frames: int, frames_per_block: int, h: int, w: int) -> int:
    """Self-attention key/value bytes of the rollout's cache: every frame but the (uncommitted) last block's."""
    from oneforcing.pipelines.layout import BlockLayout

    frames = BlockLayout(frames_per_block, latent_frames).cache_frames()
    config = model.config
    per_frame = model.tokens_per_frame(h, w) * config.num_attention_heads * config.attention_head_dim
    return 2 * config.num_layers * frames * per_frame * model.proj_out.weight.element_size()


def phase_peaks(rollout, make_decoder) -> dict:
    """Peak GPU memory of one end-to-end rollout, split into its transformer passes and its block decodes."""
    peaks = {"transformer": 0, "decode": 0}

    def note(phase):
        torch.cuda.synchronize()
        peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    class Measured:  # wraps the decoder (patching its method would make a cycle that keeps its cache alive)
        def __init__(self, decoder):
            self.decoder = decoder

        def decode_block(self, latents):
            note("transformer")
            video = self.decoder.decode_block(latents)
            note("decode")
            return video

    clean_memory()
    rollout(make_decoder=lambda: Measured(make_decoder()))
    return {phase: round(peak / 2**30, 2) for phase, peak in peaks.items()}


def clean_memory() -> None:
    """Free what earlier measurements left (cycles included) and restart the peak counter."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def gpu_busy(fn) -> dict:
    """Kernel time vs wall time of one ``fn()`` (one stream): how much a CUDA graph could still save in launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return {"kernel_s": round(kernels, 4), "wall_s": round(wall, 4), "busy_fraction": round(kernels / wall, 3)}


def wall_time(fn, device, warmup=1, repeat=3) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, the wall clock elsewhere."""
    if torch.device(device).type == "cuda":
        return cuda_time(fn, warmup, repeat)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_tiny_vae(latent_frames, h, w, device="cuda", dtype=torch.bfloat16, repeat=3) -> dict:
    """Decode the same latents with the Wan2.1 VAE and a full-size tiny TAEHV VAE (both random weights): the Wan VAE
    streamed in 3-frame blocks (what the pipeline does), the tiny one whole and streamed in 1- and 3-frame blocks."""
    from diffusers import AutoencoderKLWan

    from oneforcing.pipelines.tiny_vae import TinyWanStreamingDecoder, TinyWanVAE
    from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan().to(dtype).eval()
        tiny = TinyWanVAE().to(dtype).eval()
    latents = torch.randn(1, 16, latent_frames, h, w, device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"

    def stream(decoder, size):
        def run():
            decoder.reset()
            with torch.no_grad():
                for s in range(0, latent_frames, size):
                    decoder.decode_block(latents[:, :, s:s + size])
        return run

    runs = {
        "wan_vae_stream3_s": stream(WanStreamingDecoder(vae, fast=False), 3),  # diffusers' own decoder path
        "wan_vae_fast_stream3_s": stream(WanStreamingDecoder(vae, fast=True), 3),
        "tiny_vae_whole_s": lambda: tiny.decode(latents),
        "tiny_vae_stream1_s": stream(TinyWanStreamingDecoder(tiny), 1),
        "tiny_vae_stream3_s": stream(TinyWanStreamingDecoder(tiny), 3),
    }
    out = {"device": str(device), "dtype": str(dtype), "latents": list(latents.shape),
           "frames": video_frame_count(latent_frames)}
    for mode in (False, True) if cuda else (False,):
        torch.backends.cudnn.benchmark = mode
        suffix = "/cudnn_benchmark" if mode else ""
        for name, fn in runs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out[name + suffix] = round(wall_time(fn, device, 1, repeat), 4)
            if cuda:
                out[name[:-len("_s")] + "_peak_gb" + suffix] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    torch.backends.cudnn.benchmark = False
    return out


def video_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every benchmark here shares: --json OUT, --frames, --height, --width (Wan2.1's 81 x 480 x 832)."""
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    return parser


def report(results: dict, path: str | None) -> None:
    """Print ``results`` as JSON, and write them to ``path`` when one is given (every benchmark here ends so)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


def main():
    parser = video_arguments(argparse.ArgumentParser())
    parser.add_argument("--backends", default="auto,cudnn,flash")
    parser.add_argument("--compile-kernels", action="store_true",
                        help="also time a variant with fused elementwise kernels (on by default on CUDA since then)")
    parser.add_argument("--unfused", action="store_true", help="also time separate clean-context passes")
    parser.add_argument("--tiny-vae", action="store_true",
                        help="only time decoders: the Wan VAE vs a full-size tiny TAEHV VAE on the same latents")
    parser.add_argument("--device", default="cuda", help="with --tiny-vae: where to decode (cpu works, slowly)")
    parser.add_argument("--vae-path", choices=("fast", "diffusers"), default="fast",
                        help="the Wan VAE decoder through the package's fast path (the default on CUDA) or "
                             "diffusers' own modules")
    parser.add_argument("--overlap", action="store_true",
                        help="also time end to end with each block decoded on a second CUDA stream")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time the last backend with the transformer's forwards replayed as CUDA graphs")
    parser.add_argument("--busy", action="store_true",
                        help="also profile one transformer rollout: GPU kernel time / wall time (launch gaps)")
    parser.add_argument("--decoder", choices=("wan", "tiny"), default="wan",
                        help="end-to-end runs decode with the Wan VAE or a full-size tiny TAEHV VAE (random weights)")
    args = parser.parse_args()
    if args.tiny_vae:
        dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
        result = time_tiny_vae(latent_frame_count(args.frames), args.height // 8, args.width // 8, args.device, dtype)
        report(result, args.json)
        return

    from torch.nn.attention import SDPBackend

    latent_frames = latent_frame_count(args.frames)
    h, w = args.height // 8, args.width // 8
    tokens_per_frame = (h // 2) * (w // 2)
    dim = 1536
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "frames": args.frames,
               "size": f"{args.width}x{args.height}"}

    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    results["gemm_8192_tflops"] = 2 * 8192**3 / cuda_time(lambda: big @ big, 3, 10) / 1e12
    del big
    for fpb in (1, 3):
        results[f"gemm_ceiling_tflops_fpb{fpb}"] = gemm_ceiling(fpb * tokens_per_frame, dim, 8960)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                results[f"attn_{name}_tflops_fpb{fpb}"] = attention_ceiling(
                    fpb * tokens_per_frame, latent_frames * tokens_per_frame // 2, 12, 128, backend)
            except RuntimeError as err:
                results[f"attn_{name}_tflops_fpb{fpb}"] = f"unavailable: {str(err)[:80]}"
    print(json.dumps(results, indent=1), flush=True)

    model, scheduler = build(args)
    # baseline a user has today: diffusers' WanTransformer3DModel on one 3-frame chunk, bidirectional, no cache
    from diffusers import WanTransformer3DModel

    with torch.device("cuda"):
        stock = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
    x3 = torch.randn(1, 16, 3, h, w, device="cuda", dtype=torch.bfloat16)
    x1 = x3[:, :, :1].contiguous()
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([1000.0], device="cuda")
    with torch.no_grad():
        results["diffusers_forward_3frames_s"] = cuda_time(lambda: stock(x3, t, text), 2, 5)
        results["diffusers_forward_1frame_s"] = cuda_time(lambda: stock(x1, t, text), 2, 5)
        results["ours_bidirectional_3frames_s"] = cuda_time(lambda: model(x3, t, text), 2, 5)
    del stock
    torch.cuda.empty_cache()

    variants = [(backend, False, True, False) for backend in args.backends.split(",")]
    from oneforcing.kernels import ops
    from oneforcing.pipelines.layout import BlockLayout

    ops.set_fused_kernels(not args.compile_kernels)  # with --compile-kernels, plain variants measure references
    if args.unfused:
        variants.insert(0, (args.backends.split(",")[0], False, False, False))
    if args.compile_kernels:
        variants.append((args.backends.split(",")[-1], True, True, False))
    if args.cuda_graphs:
        variants.append((args.backends.split(",")[-1], False, True, True))
    from oneforcing.pipelines.tiny_vae import TinyWanStreamingDecoder, TinyWanVAE
    from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

    vae = build_vae() if args.decoder == "wan" else None  # resident weights count in peak memory
    if args.decoder == "tiny":
        torch.manual_seed(0)
        tiny = TinyWanVAE(with_encoder=False).to("cuda", torch.bfloat16).eval()

        def make_decoder():
            return TinyWanStreamingDecoder(tiny)
    else:
        def make_decoder():
            return WanStreamingDecoder(vae, fast=args.vae_path == "fast")
    results["decoder"] = args.decoder if args.decoder == "tiny" else f"wan/{args.vae_path}"
    with torch.no_grad():  # first-call cuDNN set-up must not count as time to the first frame
        make_decoder().decode_block(torch.zeros(1, 16, 2, h, w, device="cuda", dtype=torch.bfloat16))
    results["resident_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)  # transformer + VAE weights
    for backend, compiled, fuse, graphs in variants:
        model.set_attention_backend(backend)
        if compiled:
            ops.set_fused_kernels(True)
        if graphs:
            model.enable_cuda_graphs()
        else:
            model.disable_cuda_graphs()
        warmup = 2 if graphs else 1  # graphs: one eager run, one capturing run
        tag = f"{backend}{'+compiled' if compiled else ''}{'' if fuse else '+unfused'}{'+graphs' if graphs else ''}"
        for fpb, first in ((1, None), (1, [1000, 750, 500, 250]), (3, None)):
            name = f"{tag}/fpb{fpb}{'/first4' if first else ''}"
            cache = rollout = None  # the previous variant's cache goes before this one's is made
            if graphs:  # the same cache every run, sized as the rollout sizes its own (no slots for the last block)
                model.cuda_graphs.reset()
                cache = model.new_kv_cache(1, BlockLayout(fpb, latent_frames).cache_frames(), h, w)
            rollout = functools.partial(run_rollout, model, scheduler, fpb, first, latent_frames, h, w, fuse=fuse,
                                        cache=cache)
            clean_memory()
            transformer_s = cuda_time(rollout, warmup, 3)
            transformer_peak = torch.cuda.max_memory_allocated()
            # roofline counts the work of the unfused rollout: fusing does the same FLOPs in fewer, larger forwards
            gemm, attn = rollout_flops(latent_frames, fpb, tokens_per_frame, WAN_1_3B, steps_first=len(first or [1]))
            attn_ceiling = results.get(f"attn_cudnn_tflops_fpb{fpb}")
            if not isinstance(attn_ceiling, float):
                attn_ceiling = results[f"attn_flash_tflops_fpb{fpb}"]
            roofline = gemm / (results[f"gemm_ceiling_tflops_fpb{fpb}"] * 1e12) + attn / (attn_ceiling * 1e12)
            first_frame = {}

            def note(video):
                if "t" not in first_frame:
                    torch.cuda.synchronize()
                    first_frame["t"] = time.perf_counter()

            clean_memory()
            t0 = time.perf_counter()
            rollout(make_decoder=make_decoder, on_frames=note)
            torch.cuda.synchronize()
            first_frame_s = first_frame["t"] - t0
            peak = torch.cuda.max_memory_allocated()  # of that one end-to-end rollout
            total = cuda_time(lambda: rollout(make_decoder=make_decoder), 0, 3)
            results[name] = {
                "transformer_s": round(transformer_s, 4),
                "roofline_s": round(roofline, 4),
                "roofline_fraction": round(roofline / transformer_s, 3),
                "end_to_end_s": round(total, 4),
                "vae_s_estimate": round(total - transformer_s, 4),
                "frames_per_s": round(args.frames / total, 2),
                "first_frame_s": round(first_frame_s, 4),
                "peak_mem_gb": round(peak / 2**30, 2),  # GiB, as every memory figure here
                "transformer_only_peak_mem_gb": round(transformer_peak / 2**30, 2),
                "kv_cache_gb": round(kv_cache_bytes(model, latent_frames, fpb, h, w) / 2**30, 2),
            }
            results[name]["peak_by_phase_gb"] = phase_peaks(rollout, make_decoder)
            if graphs:
                results[name]["graphs"] = {"captured": len(model.cuda_graphs), "replays": model.cuda_graphs.replays}
            if args.busy:
                results[name]["transformer_gpu_busy"] = gpu_busy(rollout)
            if args.overlap:
                clean_memory()
                overlapped = cuda_time(lambda: rollout(make_decoder=make_decoder, overlap=True), 1, 3)
                results[name]["overlap_end_to_end_s"] = round(overlapped, 4)
                results[name]["overlap_frames_per_s"] = round(args.frames / overlapped, 2)
                results[name]["overlap_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            print(name, json.dumps(results[name]), flush=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
