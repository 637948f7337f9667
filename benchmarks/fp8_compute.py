"""fp8 compute for the transformer: speed and error against bfloat16 on the same rollout (needs a GPU with fp8 tensor
cores: Hopper or Ada).

The transformer is quantized the way a diffusers user asks for it: saved, then loaded back with
``from_pretrained(..., quantization_config=TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(PerRow())))`` --
torchao's float8 weights with one scale per output channel and activations quantized per row on the fly, so every
linear layer runs as an fp8 matrix product (``torch._scaled_mm``) with bfloat16 output. Per rollout setting: the
transformer's time for the whole rollout (median of 3 after a warm-up) in bfloat16 and fp8; the error of fp8 against
bfloat16 on the clean latents of the same rollout (same noise) and on the frames the Wan VAE decodes from them; and, as
the scale to read those errors against, bfloat16's own run-to-run difference and its difference from a float32 run.

    python benchmarks/fp8_compute.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from rollout_benchmark import (  # this folder is on sys.path
    WAN_1_3B, build_vae, clean_memory, cuda_time, report, video_arguments,
)

SETTINGS = {"chunkwise": 3, "framewise": 1}  # latent frames per block; one step per block


def rollout_latents(model, frames_per_block: int, latent_frames: int, h: int, w: int) -> torch.Tensor:
    """The clean latents [1, 16, F, h, w] (float32) of one one-step rollout from a fixed noise and prompt."""
    from oneforcing import OneForcingScheduler, causal_rollout

    gen = torch.Generator("cuda").manual_seed(0)
    noise = torch.randn(1, 16, latent_frames, h, w, device="cuda", generator=gen)
    text = torch.randn(1, 512, 4096, device="cuda", generator=gen).to(model.dtype)
    with torch.no_grad():
        blocks = causal_rollout(model, OneForcingScheduler(), noise, text, frames_per_block=frames_per_block,
                                generator=gen)
        return torch.cat([block.latents.float() for block in blocks], dim=2)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Frames [T, H, W, 3] in 0..1 (float32) from latents [1, 16, F, h, w]."""
    from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

    with torch.no_grad():
        video = WanStreamingDecoder(vae).decode_block(latents.to(torch.bfloat16))
    return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a - b).abs()
    out = {"max_abs": round(diff.max().item(), 5), "mean_abs": round(diff.mean().item(), 6)}
    if a.dim() == 4:  # frames in 0..1
        out["psnr_db"] = round((-10 * torch.log10(diff.square().mean().clamp_min(1e-12))).item(), 2)
    return out


def fp8_model(model):
    """``model`` saved and loaded back through diffusers with torchao's float8 (row-wise) quantization."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    from oneforcing import CausalWanTransformer3DModel

    config = TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return CausalWanTransformer3DModel.from_pretrained(folder, quantization_config=config,
                                                           torch_dtype=torch.bfloat16).to("cuda").eval()


def main():
    args = video_arguments(argparse.ArgumentParser()).parse_args()
    import diffusers
    import torchao

    from oneforcing import CausalWanTransformer3DModel
    from oneforcing.pipelines.layout import latent_frame_count

    latent_frames, h, w = latent_frame_count(args.frames), args.height // 8, args.width // 8
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "torchao": torchao.__version__, "frames": args.frames, "size": f"{args.width}x{args.height}"}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalWanTransformer3DModel(**WAN_1_3B).eval()  # float32 master copy of the random weights
    vae = build_vae()
    reference = {}
    for name, fpb in SETTINGS.items():
        reference[name] = {"fp32": rollout_latents(model, fpb, latent_frames, h, w)}
    model = model.to(torch.bfloat16)
    for name, fpb in SETTINGS.items():
        ref = reference[name]
        ref["bf16"] = rollout_latents(model, fpb, latent_frames, h, w)
        again = rollout_latents(model, fpb, latent_frames, h, w)
        clean_memory()
        results[name] = {
            "bf16_transformer_s": round(cuda_time(lambda: rollout_latents(model, fpb, latent_frames, h, w), 1, 3), 4),
            "bf16_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "bf16_run_to_run_latents": difference(again, ref["bf16"]),
            "bf16_vs_fp32_latents": difference(ref["bf16"], ref["fp32"]),
            "bf16_vs_fp32_frames": difference(decode(vae, ref["bf16"]), decode(vae, ref["fp32"])),
        }
        print(name, json.dumps(results[name]), flush=True)
    quantized = fp8_model(model)
    del model
    for name, fpb in SETTINGS.items():
        ref = reference[name]
        latents = rollout_latents(quantized, fpb, latent_frames, h, w)
        clean_memory()
        results[name].update({
            "fp8_transformer_s": round(cuda_time(lambda: rollout_latents(quantized, fpb, latent_frames, h, w), 1, 3),
                                       4),
            "fp8_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "fp8_vs_bf16_latents": difference(latents, ref["bf16"]),
            "fp8_vs_bf16_frames": difference(decode(vae, latents), decode(vae, ref["bf16"])),
        })
        results[name]["fp8_speed_up"] = round(results[name]["bf16_transformer_s"] / results[name]["fp8_transformer_s"],
                                              3)
        print(name, json.dumps(results[name]), flush=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
