"""What fits on a consumer GPU: the full pipeline at its real sizes (UMT5-XXL text encoder, 1.3B transformer, Wan2.1
VAE; random weights) with bfloat16 weights, fp8 weight storage (``pipe.enable_fp8_storage()``), diffusers' model CPU
offload (``pipe.enable_model_cpu_offload()``), block-level group offload (``pipe.enable_group_offload(device)``) and
fp8 storage with either offload, each from a clean state: peak GPU memory (allocated and
reserved, GiB) and the time of one call (prompt to decoded frames, after a warm-up call), 81 frames at 480x832.

    python benchmarks/memory_table.py --json out.json
    python benchmarks/memory_table.py --tiny --device cpu      # a CPU dry run at toy sizes (times only)
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from rollout_benchmark import WAN_1_3B, report, video_arguments  # this folder is on sys.path

# Wan2.1's text encoder: google/umt5-xxl's encoder (5.7B parameters)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_UMT5 = {**UMT5_XXL, "vocab_size": 64, "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 2, "d_kv": 32}
TINY_TRANSFORMER = {**WAN_1_3B, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
                    "ffn_dim": 128, "text_dim": 64}
# name -> (fp8 weight storage, offload: None, "model" (enable_model_cpu_offload) or "group" (block-level group offload))
VARIANTS = {"bf16": (False, None), "fp8 storage": (True, None), "model offload": (False, "model"),
            "fp8 storage + model offload": (True, "model"), "group offload": (False, "group"),
            "fp8 storage + group offload": (True, "group")}
PROMPT = "a corgi surfing a wave"


def tokenizer():
    """A T5 tokenizer over the prompt's words (the vocabulary does not change the memory; the 512-token length does)."""
    from transformers import T5Tokenizer

    words = sorted(set(PROMPT.split()))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_pipeline(tiny: bool, device: str):
    """The pipeline with random weights, built on ``device`` in bfloat16 (fast for billions of parameters)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from oneforcing import CausalWanTransformer3DModel, OneForcingPipeline, OneForcingScheduler

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            text_encoder = UMT5EncoderModel(UMT5Config(**(TINY_UMT5 if tiny else UMT5_XXL))).eval()
            transformer = CausalWanTransformer3DModel(**(TINY_TRANSFORMER if tiny else WAN_1_3B), frames_per_block=3)
            vae = AutoencoderKLWan(**(dict(base_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1) if tiny else {}))
    finally:
        torch.set_default_dtype(default)
    return OneForcingPipeline(tokenizer=tokenizer(), text_encoder=text_encoder, transformer=transformer.eval(),
                              vae=vae.eval(), scheduler=OneForcingScheduler())


def measure(pipe, args, device: str) -> dict:
    """One warm-up call, then one timed call from a clean peak counter."""
    def call():
        return pipe(PROMPT, num_frames=args.frames, height=args.height, width=args.width, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    cuda = device == "cuda"
    call()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    frames = call()
    if cuda:
        torch.cuda.synchronize()
    out = {"seconds": round(time.perf_counter() - start, 3), "frames": int(frames.shape[1])}
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def main():
    parser = video_arguments(argparse.ArgumentParser())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a dry run of the script)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    if args.tiny:
        args.frames, args.height, args.width = 9, 32, 32
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
               "frames": args.frames, "size": f"{args.width}x{args.height}", "frames_per_block": 3}
    if args.device == "cuda":  # what the process holds beyond PyTorch's allocator (CUDA context, kernels)
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        results["context_gib"] = round((total - free - torch.cuda.memory_reserved()) / 2**30, 2)
    for name in args.variants.split(","):
        fp8, offload = VARIANTS[name]
        pipe = build_pipeline(args.tiny, args.device)
        if fp8:
            pipe.enable_fp8_storage()
        if offload:  # weights wait on the CPU and move to the GPU while they run (a whole model, or one block)
            pipe.to("cpu")
            if offload == "model":
                pipe.enable_model_cpu_offload(device=args.device)
            else:
                pipe.enable_group_offload(torch.device(args.device))
        results[name] = measure(pipe, args, args.device)
        print(name, json.dumps(results[name]), flush=True)
        del pipe
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report(results, args.json)


if __name__ == "__main__":
    main()
