"""Why does the demo teacher not follow its captions? Measures of each suspect, on the CPU (issue 20).

``components``: the parts that need no training --

- tokenizer: how many pieces each caption word becomes (shared pieces would blur colour words together);
- text encoder: linear probes of colour, shape and motion from its outputs, fitted on the training combinations and
  tested on the held-out ones (:func:`demo_components.word_probe`);
- VAE: the project's adherence metrics on VAE round trips of ground-truth clips (what the best possible generator in
  this latent space would score), seen and held-out prompts, at each ``--size``.

``collect``: the evaluation JSONs of ``python -m oneforcing.training.evaluate`` runs (teachers trained by the CPU
recipe, the shipped student...), the stages' ``summary.json`` files and the results of ``components`` runs with
other parts (``--pipeline``), condensed into the same results file.

    python benchmarks/demo_diagnosis.py components --json benchmarks/results/demo_diagnosis.json
    python benchmarks/demo_diagnosis.py collect --json benchmarks/results/demo_diagnosis.json \\
        --eval small_pool_seen=runs/small/eval_seen.json ... --summary small_pool=runs/small/teacher/summary.json

Each command merges its sections into ``--json`` (other sections are kept).
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
from oneforcing.training.evaluate import PROMPT_SPLITS, VideoSize, ground_truth_clip, ratio

DEMO = Path(__file__).resolve().parents[1] / "models" / "oneforcing-demo"
ADHERENCE = ("background", "colour", "shape", "motion", "joint", "identity")


def tokenizer_section(tokenizer) -> dict:
    pieces = {word: tokenizer.tokenize(word) for word in world.vocabulary()}
    longest = max(len(tokenizer.tokenize(c)) for c in world.single_object_captions())
    return {"vocabulary": len(tokenizer), "pieces_per_word": {w: len(p) for w, p in pieces.items()},
            "words_split": [w for w, p in pieces.items() if len(p) > 1], "longest_one_object_caption_tokens": longest}


def parse_size(text: str) -> VideoSize:
    frames, height, width = (int(v) for v in text.lower().split("x"))
    world.check_size(frames, height, width)
    return VideoSize(frames, height, width)


def vae_section(vae, sizes: list[VideoSize], num_prompts: int, seeds: list[int]) -> dict:
    """Per size and prompt split: mean adherence of ground truth and of its VAE round trip, PSNR, sharpness ratio."""
    out = {}
    for size in sizes:
        for name, split in PROMPT_SPLITS.items():
            started, rows = time.time(), []
            for prompt in world.split_prompts(split, num_prompts):
                for seed in seeds:
                    truth = ground_truth_clip(prompt, seed, size)  # [T, H, W, 3] in 0..1
                    video = torch.from_numpy(truth).permute(3, 0, 1, 2) * 2 - 1
                    decoded = demo_components.vae_round_trip(vae, video)
                    frames = ((decoded.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).numpy()
                    rows.append((metrics.evaluate_clip(truth, prompt), metrics.evaluate_clip(frames, prompt),
                                 demo_components.psnr_db(decoded, video)))
            key = f"{size.num_frames}x{size.height}x{size.width}/{name}"
            out[key] = {
                "ground_truth": {k: float(np.mean([getattr(r[0], k) for r in rows])) for k in ADHERENCE},
                "round_trip": {k: float(np.mean([getattr(r[1], k) for r in rows])) for k in ADHERENCE},
                "psnr_db": float(np.mean([r[2] for r in rows])),
                "edge_sharpness_ratio": ratio(np.mean([r[1].edge_sharpness for r in rows]),
                                              np.mean([r[0].edge_sharpness for r in rows])),
                "clips": len(rows), "seconds": round(time.time() - started, 1),
            }
            print(key, json.dumps(out[key]), flush=True)
    return out


def components(args) -> dict:
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(args.pipeline / "tokenizer"))
    text_encoder = UMT5EncoderModel.from_pretrained(str(args.pipeline / "text_encoder")).eval()
    vae = AutoencoderKLWan.from_pretrained(str(args.pipeline / "vae")).to(args.device).eval()
    sections = {"tokenizer": tokenizer_section(tokenizer),
                "text_encoder": demo_components.word_probe(tokenizer, text_encoder)}
    print(json.dumps(sections), flush=True)
    sections["vae_round_trip"] = vae_section(vae, [parse_size(s) for s in args.size], args.num_prompts, args.seeds)
    return sections


def condensed_evaluation(path: Path) -> dict:
    """Per model of an evaluate JSON: the mean (and std over seeds) of each summary figure, and the settings."""
    data = json.loads(path.read_text())
    settings = {k: data["settings"][k] for k in ("prompt_source", "seeds", "num_frames", "height", "width", "device")}
    models = {}
    for name, entry in data["models"].items():
        summary = entry.get("summary", {})
        models[name] = {k: {"mean": round(v["mean"], 4), "std": round(v["std"], 4)} for k, v in summary.items()}
        models[name]["spec"] = entry.get("spec")
    return {"settings": settings, "models": models}


def collect(args) -> dict:
    evaluations = {}
    for item in args.eval:
        name, _, path = item.partition("=")
        evaluations[name] = condensed_evaluation(Path(path))
    summaries = {}
    for item in args.summary:
        name, _, path = item.partition("=")
        summaries[name] = json.loads(Path(path).read_text())
    other_components = {}
    for item in args.components:
        name, _, path = item.partition("=")
        other_components[name] = {k: v for k, v in json.loads(Path(path).read_text()).items() if k != "commands"}
    return {"evaluations": evaluations, "training_summaries": summaries, "other_components": other_components}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("components", "collect"))
    parser.add_argument("--json", type=Path, required=True, help="results file (sections are merged into it)")
    parser.add_argument("--pipeline", type=Path, default=DEMO, help="pipeline folder with tokenizer, text encoder, VAE")
    parser.add_argument("--size", nargs="+", default=["81x128x128", "17x64x64"], help="FRAMESxHEIGHTxWIDTH")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the VAE round trips run")
    parser.add_argument("--eval", nargs="*", default=[], metavar="NAME=EVAL_JSON")
    parser.add_argument("--summary", nargs="*", default=[], metavar="NAME=SUMMARY_JSON")
    parser.add_argument("--components", nargs="*", default=[], metavar="NAME=COMPONENTS_JSON",
                        help="the results of a components run with other parts (e.g. a retrained VAE)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = components(args) if args.command == "components" else collect(args)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.update(sections)
    results.setdefault("commands", {})[args.command] = "python benchmarks/demo_diagnosis.py " + " ".join(sys.argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
