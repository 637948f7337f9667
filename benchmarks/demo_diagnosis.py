"""Why does the demo teacher not follow its captions? Measures of each suspect, on the CPU (issue 20).

``components``: the parts that need no training --

- tokenizer: how many pieces each caption word becomes (shared pieces would blur colour words together);
- text encoder: linear probes of colour, shape and motion from its outputs, fitted on the training combinations and
  tested on the held-out ones (:func:`demo_components.word_probe`);
- VAE: the project's adherence metrics on VAE round trips of ground-truth clips (what the best possible generator in
  this latent space would score), seen and held-out prompts, at each ``--size``.

``dmd-targets``: what the DMD loss asks of a one-step student, by noise level. The student's own one-step clips
(the ``--pipeline``'s transformer, the first ``--size``, seeds ``--seeds``, ``--num-prompts`` prompts of each split)
are noised at each ``--timesteps`` t with one noise per clip, and the frozen ``--teacher``'s guided x0 prediction
there (the DMD "real score", :func:`distill.real_score_x0`, with each ``--guidance``, by default the recipe's
``distill.guidance_scale``) is decoded and scored like a clip. The DMD gradient at t points from the critic's
prediction towards that target: a t where the target draws the caption's shape is a t where the loss can teach the
shape; the share of DMD timesteps at each shift that falls there is listed beside it.

``adversarial-levels``: at which noise levels can the adversarial head tell real clips from the student's? The
world's renders of the prompts (encoded by the pipeline's VAE, as the recipe's ``encode`` stage does) and the
student's one-step clips of the same prompts and seeds are noised at each ``--timesteps`` t with one noise per
(prompt, seed), and the ``--teacher`` (the critic's starting weights) reads them; what the head reads is condensed to
the mean and standard deviation over tokens of the hidden states after the recipe's ``distill.gan.feature_layers``.
Per t: the accuracy of a linear probe telling real from student, fitted on one split's clips and tested on the
other's (:func:`demo_components.ridge_probe_accuracy`, both ways), and the share of the features' variance that real
against student explains; beside them, the share of the adversarial term's timesteps at each shift.

``collect``: the evaluation JSONs of ``python -m oneforcing.training.evaluate`` runs (teachers trained by the CPU
recipe, the shipped student...), the stages' ``summary.json`` files and the results of ``components`` runs with
other parts (``--pipeline``), condensed into the same results file.

    python benchmarks/demo_diagnosis.py components --json benchmarks/results/demo_diagnosis.json
    python benchmarks/demo_diagnosis.py dmd-targets --json benchmarks/results/demo_diagnosis.json \\
        --teacher models/oneforcing-demo-training/teacher --seeds 0 1
    python benchmarks/demo_diagnosis.py adversarial-levels --json benchmarks/results/demo_diagnosis.json \\
        --teacher models/oneforcing-demo-training/teacher --seeds 0 1 2 3 --timesteps 100 300 500 700 900
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
from oneforcing.training.config import DistillConfig, load_config
from oneforcing.training.distill import real_score_x0
from oneforcing.training.evaluate import PROMPT_SPLITS, VideoSize, ground_truth_clip, ground_truth_video, ratio
from oneforcing.training.flow import add_noise, sample_timesteps

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
                    rows.append((metrics.evaluate_clip(truth, prompt),
                                 metrics.evaluate_clip(metrics.world_frames(decoded), prompt),
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


def timestep_shares(timesteps: list[float], shifts: list[float], section: DistillConfig) -> dict:
    """Per shift: the share of the DMD loss's timesteps (``flow.sample_timesteps`` with ``section``'s clamp) in each
    band of 0..1000 that ``timesteps`` cut it into."""
    edges = sorted({0.0, 1000.0, *(float(t) for t in timesteps)})
    draws = torch.Generator().manual_seed(0)
    out = {}
    for shift in shifts:
        t = sample_timesteps(200_000, shift=shift, min_timestep=section.min_timestep,
                             max_timestep=section.max_timestep, generator=draws)
        out[str(shift)] = {f"{lo:g}-{hi:g}": float(((t >= lo) & (t < hi)).float().mean())
                           for lo, hi in zip(edges[:-1], edges[1:])}
    return out


class TargetScorer:
    """Scores latents [1, C, F, h, w] of the demo's latent space as clips: decoded, then :func:`metrics.evaluate_clip`
    against the caption, condensed to the shape figures :func:`shape_row` keeps."""

    def __init__(self, vae):
        from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

        self.vae, self.decoder = vae, WanStreamingDecoder(vae)

    def __call__(self, latents: torch.Tensor, prompt: str) -> dict:
        video = self.decoder.decode_all(latents.to(self.vae.dtype))[0]  # [3, T, H, W] in -1..1
        return shape_row(metrics.evaluate_clip(metrics.world_frames(video), prompt))


def shape_row(result: metrics.ClipResult) -> dict:
    """Shape and colour adherence of a scored clip, the share of its objects drawn round, and each one's shape."""
    return {"shape": result.shape, "colour": result.colour,
            "round": float(np.mean([o.predicted_shape == "circle" for o in result.objects])),
            "predicted": [o.predicted_shape for o in result.objects]}


def target_key(t: float, guidance: float) -> str:
    return f"t={t:g} g={guidance:g}"


def split_summary(rows: list[dict], keys: list[str]) -> dict:
    """Per scored clip key ("student", "t=... g=..."): the mean shape, colour and round figures over ``rows``."""
    return {key: {figure: float(np.mean([row[key][figure] for row in rows])) for figure in ("shape", "colour", "round")}
            for key in keys}


def student_and_teacher(args):
    """(the ``--pipeline`` with the student as its transformer, the ``--teacher`` transformer), on ``--device``."""
    from oneforcing.pipelines.loading import load_transformer
    from oneforcing.pipelines.pipeline_one_forcing import OneForcingPipeline

    pipe = OneForcingPipeline.from_pretrained(str(args.pipeline)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_transformer(args.teacher).to(args.device).eval()


def student_clips(pipe, args):
    """For every split, prompt and seed: (split name, prompt, seed, prompt embeddings [1, L, D], the student's
    one-step latents [1, C, F, h, w] at the first ``--size``, one noise of their shape drawn from the seed)."""
    size = parse_size(args.size[0])
    for name, split in PROMPT_SPLITS.items():
        for prompt in world.split_prompts(split, args.num_prompts):
            embeds = pipe.encode_prompt(prompt, device=args.device)
            for seed in args.seeds:
                x_gen = pipe(prompt, num_frames=size.num_frames, height=size.height, width=size.width,
                             generator=torch.Generator().manual_seed(seed), output_type="latent").frames
                noise = torch.randn(x_gen.shape, generator=torch.Generator().manual_seed(1000 + seed)).to(x_gen)
                yield name, prompt, seed, embeds, x_gen, noise


def dmd_targets(args) -> dict:
    section = load_config(args.config).distill
    pipe, teacher = student_and_teacher(args)
    score = TargetScorer(pipe.vae)
    guidances = args.guidance or [section.guidance_scale]
    keys = ["student", *[target_key(t, g) for t in args.timesteps for g in guidances]]
    negative = pipe.encode_prompt("", device=args.device)  # [1, L, D]
    rows = []
    with torch.no_grad():
        for name, prompt, seed, embeds, x_gen, noise in student_clips(pipe, args):
            row = {"split": name, "prompt": prompt, "seed": seed, "student": score(x_gen, prompt)}
            for t in args.timesteps:
                at = torch.full((1,), float(t), device=x_gen.device)
                x_t = add_noise(x_gen, noise, at)
                for guidance in guidances:
                    target = real_score_x0(teacher, x_t, at, embeds, negative, guidance)
                    row[target_key(t, guidance)] = score(target, prompt)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {name: split_summary([r for r in rows if r["split"] == name], keys) for name in PROMPT_SPLITS}
    return {"dmd_targets": {"student": str(args.pipeline), "teacher": str(args.teacher), "size": args.size[0],
                            "seeds": args.seeds, "guidance_scales": guidances, "summary": summary,
                            "timestep_shares": timestep_shares(args.timesteps, args.shifts, section), "clips": rows}}


def head_features(critic, latents, noise, t: float, embeds, layers) -> np.ndarray:
    """What the adversarial head reads, condensed: the mean and standard deviation over tokens of the critic's hidden
    states after ``layers`` for ``latents`` [1, C, F, h, w] noised with ``noise`` at ``t`` -> [2 * len(layers) * D]."""
    at = torch.full((1,), float(t), device=latents.device)
    out = critic(add_noise(latents, noise, at), at, embeds, attention_mode="bidirectional",
                 hidden_states_at=tuple(layers))
    return torch.cat([torch.cat([h.mean(1), h.std(1)], -1) for h in out.hidden_states], -1)[0].float().cpu().numpy()


def adversarial_levels(args) -> dict:
    from oneforcing.pipelines.vae_streaming import encode_video

    section = load_config(args.config).distill
    layers = list(section.gan.feature_layers)
    pipe, critic = student_and_teacher(args)
    size = parse_size(args.size[0])
    features = {t: [] for t in args.timesteps}  # per t: [real, student] rows of every clip
    splits = []  # per clip
    with torch.no_grad():
        for name, prompt, seed, embeds, x_gen, noise in student_clips(pipe, args):
            video = ground_truth_video(prompt, seed, size)[None].to(args.device)
            real = encode_video(pipe.vae, video).to(x_gen)
            for t in args.timesteps:
                features[t] += [head_features(critic, x, noise, t, embeds, layers) for x in (real, x_gen)]
            splits.append(name)
    labels, seen = ["real", "student"] * len(splits), np.repeat(np.array(splits) == "seen", 2)  # per row
    levels = {}
    for t, rows in features.items():
        rows = np.stack(rows)
        levels[f"{t:g}"] = {"probe_seen_to_heldout": demo_components.ridge_probe_accuracy(rows, labels, seen),
                            "probe_heldout_to_seen": demo_components.ridge_probe_accuracy(rows, labels, ~seen),
                            "between_fraction": demo_components.between_class_fraction(rows, labels)}
    return {"adversarial_levels": {"student": str(args.pipeline), "critic": str(args.teacher),
                                   "feature_layers": layers, "size": args.size[0], "seeds": args.seeds,
                                   "clips_per_split": len(splits) // len(PROMPT_SPLITS), "levels": levels,
                                   "timestep_shares": timestep_shares(args.timesteps, args.shifts, section)}}


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
    parser.add_argument("command", choices=("components", "dmd-targets", "adversarial-levels", "collect"))
    parser.add_argument("--json", type=Path, required=True, help="results file (sections are merged into it)")
    parser.add_argument("--pipeline", type=Path, default=DEMO, help="pipeline folder with tokenizer, text encoder, VAE")
    parser.add_argument("--size", nargs="+", default=["81x128x128", "17x64x64"], help="FRAMESxHEIGHTxWIDTH")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the VAE round trips run")
    parser.add_argument("--teacher", type=Path,
                        help="dmd-targets, adversarial-levels: the teacher's transformer folder (the critic's start)")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "training" / "configs"
                        / "demo.json", help="dmd-targets, adversarial-levels: the recipe whose distill section "
                        "(guidance, clamp, the head's feature layers) is used")
    parser.add_argument("--timesteps", type=float, nargs="+", default=[100, 200, 300, 400, 500, 600, 700, 800, 900],
                        help="dmd-targets, adversarial-levels: noise levels (0..1000)")
    parser.add_argument("--guidance", type=float, nargs="*", default=[],
                        help="dmd-targets: g of the real score cond + g (cond - uncond) (default: the recipe's)")
    parser.add_argument("--shifts", type=float, nargs="+", default=[5.0, 2.0, 1.0],
                        help="dmd-targets, adversarial-levels: timestep shifts whose shares of the loss's timesteps "
                        "are listed")
    parser.add_argument("--eval", nargs="*", default=[], metavar="NAME=EVAL_JSON")
    parser.add_argument("--summary", nargs="*", default=[], metavar="NAME=SUMMARY_JSON")
    parser.add_argument("--components", nargs="*", default=[], metavar="NAME=COMPONENTS_JSON",
                        help="the results of a components run with other parts (e.g. a retrained VAE)")
    args = parser.parse_args()
    if args.command in ("dmd-targets", "adversarial-levels") and args.teacher is None:
        parser.error(f"{args.command} needs --teacher (the teacher's transformer folder)")
    torch.set_num_threads(args.threads)
    commands = {"components": components, "dmd-targets": dmd_targets, "adversarial-levels": adversarial_levels,
                "collect": collect}
    sections = commands[args.command](args)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.update(sections)
    results.setdefault("commands", {})[args.command] = "python benchmarks/demo_diagnosis.py " + " ".join(sys.argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
