"""Which background colour can a demo LoRA paint, and does the shipped one paint it? (issue 17; CPU, minutes)

``vae``: world clips whose backgrounds are re-coloured (as ``encode.world_background_rgb`` does) go through the demo
VAE (encode, decode) for each candidate colour; per colour, the border colour per frame (:func:`metrics.border_colours`,
mean over the clips) against the painted one. A LoRA trained on such latents can at best decode to that round trip,
so the colour to train is one the VAE keeps (small error in every frame) that is far from the base demo's backgrounds.

``lora``: the demo pipeline (the one the CLI uses) with the demo LoRA at several strengths: the generated border per
prompt and seed, and its distance to the trained colour's VAE round trip (from a ``vae`` run in the same file).

    python benchmarks/demo_lora_backgrounds.py vae --json benchmarks/results/demo_lora_backgrounds.json
    python benchmarks/demo_lora_backgrounds.py lora --json benchmarks/results/demo_lora_backgrounds.json \\
        --lora models/oneforcing-demo-loras/white_background.safetensors --colour white

Each command merges its section into ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from oneforcing.training import demo_components, metrics, world

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "oneforcing-demo"
CANDIDATES = {  # RGB 0..1: the world's object colours as backgrounds, and a few more
    **world.COLOURS, "light gray": (0.75, 0.75, 0.75), "cyan": (0.10, 0.80, 0.85), "magenta": (0.90, 0.15, 0.75),
    "orange": (0.95, 0.45, 0.05), "dark red": (0.60, 0.10, 0.10), "pink": (0.95, 0.60, 0.70),
    **{f"base {name}": rgb for name, rgb in world.BACKGROUNDS.items()},  # the base demo's own, for scale
}
SIZE = (9, 128, 128)  # frames, height, width: the LoRA recipe's clips
PROMPTS = ("a red circle moves left on a black background", "a yellow square grows on a dark blue background",
           "a green triangle moves down on a gray checkered background")


def _rounded(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def vae_section(args) -> dict:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(args.pipeline / "vae")).eval()
    base = np.array(list(world.BACKGROUNDS.values()))
    out = {}
    for name, rgb in CANDIDATES.items():
        started = time.time()
        borders = demo_components.background_round_trip(vae, rgb, args.seeds, *SIZE)
        error = metrics.colour_distance(borders, rgb)  # per frame
        out[name] = {"painted": _rounded(rgb), "round_trip_per_frame": [_rounded(b) for b in borders],
                     "mean_error": round(float(error.mean()), 3), "worst_frame_error": round(float(error.max()), 3),
                     "distance_to_base_backgrounds": round(float(metrics.colour_distance(base, rgb).min()), 3),
                     "seconds": round(time.time() - started, 1)}
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "round_trip_per_frame"}), flush=True)
    return {"vae_round_trip": {"size": "x".join(map(str, SIZE)), "seeds": args.seeds, "colours": out}}


def lora_section(args, results: dict) -> dict:
    from oneforcing import OneForcingPipeline

    target = np.array(results["vae_round_trip"]["colours"][args.colour]["round_trip_per_frame"])
    pipe = OneForcingPipeline.from_pretrained(args.pipeline)
    pipe.load_lora_weights(str(args.lora), adapter_name="demo")
    rows, summary = {}, {}
    for strength in args.strengths:
        pipe.set_adapters("demo", strength)
        rows[str(strength)] = []
        for prompt in PROMPTS:
            for seed in args.seeds:
                frames = pipe(prompt, num_frames=SIZE[0], height=SIZE[1], width=SIZE[2],
                              generator=torch.Generator().manual_seed(seed)).frames[0]
                borders = metrics.border_colours(frames)
                rows[str(strength)].append({
                    "prompt": prompt, "seed": seed, "border": _rounded(borders.mean(axis=0)),
                    "border_per_frame": [_rounded(b) for b in borders],
                    "distance_to_trained": round(float(metrics.colour_distance(borders, target).mean()), 3)})
        summary[str(strength)] = {
            "border": _rounded(np.mean([r["border"] for r in rows[str(strength)]], axis=0)),
            "distance_to_trained": _rounded([r["distance_to_trained"] for r in rows[str(strength)]])}
        print(strength, json.dumps(summary[str(strength)]), flush=True)
    return {"lora": {"file": str(args.lora), "colour": args.colour, "size": "x".join(map(str, SIZE)),
                     "summary": summary, "per_strength": rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("vae", "lora"))
    parser.add_argument("--json", type=Path, required=True, help="results file (sections are merged into it)")
    parser.add_argument("--pipeline", type=Path, default=DEMO)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora", type=Path, help="lora: the LoRA file")
    parser.add_argument("--colour", help="lora: the colour it was trained on (a name of the vae section)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.update(vae_section(args) if args.command == "vae" else lora_section(args, results))
    results.setdefault("commands", {})[args.command] = "python benchmarks/demo_lora_backgrounds.py " + " ".join(sys.argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
