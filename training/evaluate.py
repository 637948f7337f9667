"""Evaluate models on prompts of the synthetic world: adherence, sharpness, temporal consistency and speed.

Quality (on a GPU when there is one), then speed on another machine, then one table::

    python -m oneforcing.training.evaluate --model gt=ground-truth --model of=models/oneforcing-demo \\
        --model dmd=models/oneforcing-demo:transformer=runs/framewise_nogan,steps=1 --prompts heldout \\
        --num-prompts 8 --seeds 0 1 --out quality.json --markdown table.md --workers 8
    python -m oneforcing.training.evaluate --speed-only --device cpu --speed-clips 1 --warmup-frames 5 \\
        --model of=... --model dmd=... --out speed.json
    python -m oneforcing.training.evaluate --tabulate --out quality.json --speed-from speed.json --markdown table.md

Each ``--model NAME=PATH[:key=value,...]`` is the literal ``ground-truth`` (the world's own renders of the prompt) or
a ``OneForcingPipeline`` folder (``OneForcingPipeline.from_pretrained``). Options:

- ``transformer=DIR_OR_FILE``: use this transformer instead of the folder's (a diffusers folder or a checkpoint file).
- ``sampler=rollout`` (default): the pipeline's causal rollout, with ``steps=N`` denoising steps per block (N evenly
  spaced timesteps from 1000, warped by the scheduler: 4 = [1000, 750, 500, 250]; default: the scheduler's own list),
  ``first_block_steps=N`` and ``frames_per_block=K`` (1 = frame-wise, 3 = chunk-wise; default: the transformer's).
- ``sampler=teacher``: the bidirectional teacher's Euler ODE solve with classifier-free guidance, exactly as the
  recipe's ``ode-pairs`` stage runs it (:func:`.ode.teacher_trajectory`): ``steps`` (default 32), ``shift`` (8),
  ``guidance`` (3.0, standard ``uncond + s (cond - uncond)``; 1 = no guidance) and the empty negative prompt
  (the recipe's default ``encode.negative_prompt``). The latents are decoded by the pipeline's VAE in one pass.
- ``sampler=round-trip``: no transformer runs; the world's render of the prompt is encoded by the pipeline's VAE
  (posterior mode) and decoded again (:func:`.demo_components.vae_round_trip`). It is what a generator that drew
  exactly the encoder's latents would give: the ceiling of every model decoded by that VAE. Takes no other option.

Every model sees the same prompts and seeds; the seed fixes the ground truth's layout and the models' initial noise
(drawn on the CPU, so a seed gives the same noise on every device). Ground truth is rendered for every (prompt, seed)
whatever the models, as the reference of the sharpness and flicker ratios. The metrics are deterministic for given
frames; on CUDA, cuDNN is put in deterministic mode so that the frames repeat too.

Speed: wall-clock seconds of each clip's generation (text encoding, sampling, decoding; after ``--warmup`` untimed
clips of ``--warmup-frames`` frames) on ``--device`` with torch's current thread count, as frames per second.
``--speed-only`` times ``--speed-clips`` clips per model and measures nothing else; ``--speed-from`` adds such a run's
figures to the table of a quality run (models matched by name).

Robustness: ``--out`` (and ``--markdown``) are rewritten, atomically, after every model, so a run cut short (e.g. by
``timeout``) keeps every finished model; ``--resume`` skips the models that ``--out`` already holds with the same
request, weights (the files' content, not their paths) and settings. ``--workers N`` scores clips in N processes
while the next clips are generated.

Outputs: ``--out`` JSON (settings, per model the per-seed and mean/std summaries and every clip's metrics, per-object
details included; or, with ``--speed-only``, the timings) and ``--markdown`` table (rows = models; mean +- std over
seeds). See :mod:`.metrics` for what each number measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..pipelines.atomic import file_digest
from ..pipelines.presets import DTYPES
from . import metrics, world

GROUND_TRUTH = "ground-truth"
SAMPLERS = ("rollout", "teacher", "round-trip")
SUMMARY_KEYS = ("background", "colour", "shape", "motion", "joint", "sharpness", "sharpness_denoised",
                "edge_sharpness", "flicker", "identity")
TABLE_KEYS = ("background", "colour", "shape", "motion", "joint", "sharpness", "edge_sharpness", "flicker", "identity")
RATIOS = {"sharpness": "edge_energy", "sharpness_denoised": "edge_energy_denoised", "edge_sharpness": "edge_sharpness",
          "flicker": "flicker"}  # summary key -> the clip figure whose mean is compared with ground truth's
# settings that must agree for --resume to reuse a model's results
RESUME_KEYS = ("mode", "prompts", "seeds", "num_frames", "height", "width", "colour_tolerance", "dtype", "speed_clips",
               "warmup", "warmup_frames")


# -- model specifications ---------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """One ``--model`` argument."""

    name: str
    path: str
    sampler: str = "rollout"
    steps: int | None = None
    first_block_steps: int | None = None
    frames_per_block: int | None = None
    transformer: str | None = None
    guidance: float = 3.0
    shift: float = 8.0

    @property
    def is_ground_truth(self) -> bool:
        return self.path == GROUND_TRUTH


_OPTION_TYPES = {"sampler": str, "steps": int, "first_block_steps": int, "frames_per_block": int,
                 "transformer": str, "guidance": float, "shift": float}
_OPTIONS = re.compile(r"^[a-z_]+=[^,]*(,[a-z_]+=[^,]*)*$")


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=PATH[:key=value,...]`` -> :class:`ModelSpec` (options: see the module docstring)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest or not re.fullmatch(r"[\w.+-]+", name):
        raise ValueError(f"--model {text!r}: expected NAME=PATH[:key=value,...] with a plain NAME (letters, digits, "
                         f"_.+-)")
    path, options = rest, {}
    head, colon, tail = rest.rpartition(":")
    if colon and _OPTIONS.match(tail):
        path = head
        for item in tail.split(","):
            key, _, value = item.partition("=")
            if key not in _OPTION_TYPES:
                raise ValueError(f"--model {name}: unknown option {key!r}; known: {sorted(_OPTION_TYPES)}")
            try:
                options[key] = _OPTION_TYPES[key](value)
            except ValueError:
                raise ValueError(f"--model {name}: option {key}={value!r} is not a {_OPTION_TYPES[key].__name__}")
    spec = ModelSpec(name=name, path=path, **options)
    if spec.sampler not in SAMPLERS:
        raise ValueError(f"--model {name}: sampler must be one of {SAMPLERS}, got {spec.sampler!r}")
    for key in ("steps", "first_block_steps", "frames_per_block"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise ValueError(f"--model {name}: {key} must be >= 1, got {value}")
    if spec.is_ground_truth and options:
        raise ValueError(f"--model {name}: {GROUND_TRUTH} takes no options, got {sorted(options)}")
    if spec.sampler == "round-trip" and set(options) - {"sampler"}:
        raise ValueError(f"--model {name}: the round-trip sampler runs no transformer; it takes no other option, "
                         f"got {sorted(set(options) - {'sampler'})}")
    if spec.sampler == "teacher" and (spec.first_block_steps or spec.frames_per_block):
        raise ValueError(f"--model {name}: the teacher sampler denoises the whole clip at once; "
                         "first_block_steps / frames_per_block do not apply")
    if not spec.is_ground_truth and not Path(path).is_dir():
        raise ValueError(f"--model {name}: {path} is not a folder (a OneForcingPipeline folder or {GROUND_TRUTH!r})")
    if spec.transformer is not None and not Path(spec.transformer).exists():
        raise ValueError(f"--model {name}: transformer={spec.transformer} does not exist")
    return spec


def evenly_spaced_timesteps(steps: int) -> list[float]:
    """[1000, 1000 (N-1)/N, ..., 1000/N]: the un-warped per-block list of an N-step student (4 -> 1000, 750, ...)."""
    return [1000.0 * (steps - i) / steps for i in range(steps)]


# -- devices ----------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    """``auto`` -> "cuda" when a GPU is visible, else "cpu"; anything else is checked and returned."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__})")
    return name


def device_description(device: str) -> str:
    """Words for the table: the GPU's or CPU's name and the thread count."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def make_deterministic() -> None:
    """Same seeds, same frames: cuDNN picks fixed algorithms (matmuls and attention forwards are deterministic)."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


# -- generators -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoSize:
    num_frames: int
    height: int
    width: int


Generate = Callable[[str, int, VideoSize], np.ndarray]  # (prompt, seed, size) -> frames [T, H, W, 3] float32 0..1


def ground_truth_video(prompt: str, seed: int, size: VideoSize) -> torch.Tensor:
    """The world's render of ``prompt`` with the layout of ``seed``: video [3, T, H, W] in -1..1."""
    split = world.caption_split(prompt) or "train"
    video, _, _ = world.render_clip(seed, split, size.num_frames, size.height, size.width, caption=prompt)
    return video


def ground_truth_clip(prompt: str, seed: int, size: VideoSize) -> np.ndarray:
    """:func:`ground_truth_video` as frames [T, H, W, 3] in 0..1."""
    return metrics.world_frames(ground_truth_video(prompt, seed, size))


def load_pipeline(spec: ModelSpec, device: str, dtype: torch.dtype):
    from ..pipelines.pipeline_one_forcing import OneForcingPipeline
    from ..pipelines.loading import load_transformer

    if not (Path(spec.path) / "model_index.json").is_file():
        raise ValueError(f"--model {spec.name}: {spec.path} has no model_index.json; it must be a saved "
                         "OneForcingPipeline (for a bare transformer folder use PIPELINE:transformer=DIR)")
    extra = {}
    if spec.transformer is not None:
        source = Path(spec.transformer)
        if source.is_dir() and not (source / "config.json").is_file() and (source / "transformer").is_dir():
            source = source / "transformer"  # a pipeline folder given as the transformer
        if source.is_dir() and not (source / "config.json").is_file():
            raise ValueError(f"--model {spec.name}: transformer={source} is not a diffusers model folder "
                             "(no config.json)")
        if not source.exists():
            raise ValueError(f"--model {spec.name}: transformer={source} is neither a folder nor a file")
        extra["transformer"] = load_transformer(source, dtype)
    pipe = OneForcingPipeline.from_pretrained(spec.path, dtype=dtype, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_generator(pipe, spec: ModelSpec, max_sequence_length: int) -> Generate:
    """A (prompt, seed, size) -> frames function for a loaded pipeline, by the spec's sampler."""
    device = pipe._execution_device

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(seed)

    if spec.sampler == "rollout":
        steps = evenly_spaced_timesteps(spec.steps) if spec.steps else None
        first = evenly_spaced_timesteps(spec.first_block_steps) if spec.first_block_steps else None

        def generate(prompt: str, seed: int, size: VideoSize) -> np.ndarray:
            out = pipe(
                prompt, num_frames=size.num_frames, height=size.height, width=size.width,
                frames_per_block=spec.frames_per_block, denoising_timesteps=steps, first_block_timesteps=first,
                generator=seeded(seed), output_type="np", max_sequence_length=max_sequence_length,
            )
            return np.asarray(out.frames[0], dtype=np.float32)

        return generate

    if spec.sampler == "round-trip":
        from .demo_components import vae_round_trip

        def round_trip(prompt: str, seed: int, size: VideoSize) -> np.ndarray:
            return metrics.world_frames(vae_round_trip(pipe.vae, ground_truth_video(prompt, seed, size)))

        return round_trip

    from ..pipelines.vae_streaming import WanStreamingDecoder
    from .ode import teacher_trajectory

    model_dtype = pipe.transformer.proj_out.weight.dtype
    negative_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def generate_teacher(prompt: str, seed: int, size: VideoSize) -> np.ndarray:
        embeds = pipe.encode_prompt(prompt, max_sequence_length=max_sequence_length, device=device, dtype=model_dtype)
        negative = None
        if spec.guidance != 1.0:
            if "" not in negative_cache:
                negative_cache[""] = pipe.encode_prompt("", max_sequence_length=max_sequence_length, device=device,
                                                        dtype=model_dtype)
            negative = negative_cache[""]
        noise = pipe.prepare_latents(1, size.num_frames, size.height, size.width, seeded(seed), device=device)
        states = teacher_trajectory(
            pipe.transformer, noise, embeds, negative, keep_timesteps=[], num_inference_steps=spec.steps or 32,
            shift=spec.shift, guidance_scale=spec.guidance,
        )
        video = WanStreamingDecoder(pipe.vae).decode_all(states[:, -1].to(pipe.vae.dtype))  # [1, 3, T, H, W]
        return metrics.world_frames(video[0])

    return generate_teacher


def weights_fingerprint(spec: ModelSpec) -> str | None:
    """SHA-256 over the names and digests of the files the model is made of (every file of its pipeline folder, and
    its transformer override: a folder or a single checkpoint file), so that ``--resume`` reruns a model retrained in
    place at the same path. None for ground truth."""
    if spec.is_ground_truth:
        return None
    digest = hashlib.sha256()
    for source in (Path(p) for p in (spec.path, spec.transformer) if p):
        files = [source] if source.is_file() else sorted(f for f in source.rglob("*") if f.is_file())
        for file in files:
            name = file.name if file == source else file.relative_to(source).as_posix()
            digest.update(f"{name} {file_digest(file)}\n".encode())
    return digest.hexdigest()


def spec_settings(spec: ModelSpec, pipe=None) -> dict:
    """What the model ran with, for the JSON (the defaults it resolved included)."""
    if spec.is_ground_truth:
        return {"name": spec.name, "path": spec.path, "sampler": "world renderer"}
    out = asdict(spec)
    if spec.sampler != "teacher":
        del out["guidance"], out["shift"]
    if pipe is not None and spec.sampler != "round-trip":
        if spec.sampler == "rollout":
            out["frames_per_block"] = spec.frames_per_block or pipe.transformer.config.frames_per_block
            scheduler = pipe.scheduler
            steps = evenly_spaced_timesteps(spec.steps) if spec.steps else None
            first = evenly_spaced_timesteps(spec.first_block_steps) if spec.first_block_steps else None
            out["block_timesteps"] = scheduler.block_timesteps(1, steps, first).tolist()
            out["first_block_timesteps"] = scheduler.block_timesteps(0, steps, first).tolist()
        else:
            out["steps"] = spec.steps or 32
        out["parameters"] = sum(p.numel() for p in pipe.transformer.parameters())
    for key in [k for k, v in out.items() if v is None]:
        del out[key]
    return out


# -- scoring ----------------------------------------------------------------------------------------------------------
def score_clip(frames: np.ndarray, prompt: str, colour_tolerance: float) -> dict:
    """:func:`metrics.evaluate_clip` as a dict (a top-level function, so that worker processes can run it)."""
    return metrics.evaluate_clip(frames, prompt, colour_tolerance=colour_tolerance).to_dict()


def _quiet_worker() -> None:
    # several workers share the cores: one thread each
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)


class ClipScorer:
    """Scores clips inline (``workers=0``) or in ``workers`` processes while the caller generates the next clips.
    ``submit`` returns a future; the results are the same either way (the metrics are deterministic).

    The workers are spawned, never forked: a child forked while one of the parent's threads (OpenMP's, OpenCV's)
    holds a lock can hang for good (seen here), and a forked child must not inherit a CUDA context. Each one imports
    the package once (seconds) when the first clips arrive, while the caller goes on generating."""

    def __init__(self, workers: int, colour_tolerance: float):
        if workers < 0:
            raise ValueError(f"--workers must be >= 0, got {workers}")
        self.colour_tolerance = colour_tolerance
        self.pool = None
        if workers:
            self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_quiet_worker)

    def submit(self, frames: np.ndarray, prompt: str) -> Future:
        if self.pool is not None:
            return self.pool.submit(score_clip, frames, prompt, self.colour_tolerance)
        done: Future = Future()
        try:
            done.set_result(score_clip(frames, prompt, self.colour_tolerance))
        except Exception as error:  # noqa: BLE001 -- handed to the caller through the future, as a pool would
            done.set_exception(error)
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# -- evaluation -------------------------------------------------------------------------------------------------------
PROMPT_SPLITS = {"heldout": "heldout", "seen": "train"}  # --prompts name -> world split


def prompt_list(kind: str, count: int, seed: int = 0) -> list[str]:
    """``heldout`` (combinations never trained on), ``seen`` (combinations of the training split; see
    ``world.split_prompts``) or a text file of captions, one per line; ``count`` of them."""
    if count < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {count}")
    if kind in PROMPT_SPLITS:
        return world.split_prompts(PROMPT_SPLITS[kind], count, seed=seed)
    path = Path(kind)
    if not path.is_file():
        raise ValueError(f"--prompts must be 'heldout', 'seen' or a text file of world captions, got {kind!r}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    for number, prompt in enumerate(prompts, 1):
        try:
            world.parse_caption(prompt)
        except ValueError as error:
            raise ValueError(f"--prompts {path}, line {number}: {error}") from None
    if not prompts:
        raise ValueError(f"--prompts {path} holds no captions")
    return prompts[:count]


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def reference_figures(prompts: list[str], seeds: list[int], size: VideoSize) -> dict[tuple[str, int], dict]:
    """Ground truth's edge energies and flicker per (prompt, seed): the denominators of the ratios."""
    reference = {}
    for seed in seeds:
        for prompt in prompts:
            frames = ground_truth_clip(prompt, seed, size)
            reference[(prompt, seed)] = {"edge_energy": metrics.edge_energy(frames),
                                         "edge_energy_denoised": metrics.edge_energy(frames, denoise=True),
                                         "edge_sharpness": metrics.edge_sharpness(frames),
                                         "flicker": metrics.flicker(frames)}
    return reference


def summarise(clips: list[dict], reference: dict[tuple[str, int], dict], seeds: list[int]) -> dict:
    """Per seed: the mean adherence / identity over prompts and the ratios of mean edge energy and mean flicker to
    ground truth's over the same prompts; then mean and std (population) of each over seeds."""
    per_seed = {key: [] for key in SUMMARY_KEYS}
    for seed in seeds:
        mine = [c for c in clips if c["seed"] == seed]
        refs = [reference[(c["prompt"], seed)] for c in mine]
        for key in ("background", "colour", "shape", "motion", "joint", "identity"):
            per_seed[key].append(float(np.mean([c[key] for c in mine])))
        for key, field in RATIOS.items():
            per_seed[key].append(ratio(np.mean([c[field] for c in mine]), np.mean([r[field] for r in refs])))
    return {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for key, v in per_seed.items()}


def warm_up(generate: Generate, prompts: list[str], seed: int, count: int, size: VideoSize) -> float:
    """``count`` untimed clips of ``size``; returns their seconds."""
    start = time.perf_counter()
    for i in range(count):
        generate(prompts[i % len(prompts)], seed, size)
    return time.perf_counter() - start


def evaluate_model(
    name: str, generate: Generate, prompts: list[str], seeds: list[int], size: VideoSize, *, scorer: ClipScorer,
    warmup: int = 1, warmup_size: VideoSize | None = None, log=print, save_dir: Path | None = None,
) -> dict:
    """Generate and measure every (prompt, seed) clip: {"clips": [...], "seconds": s, "frames": n, "fps": f}."""
    warm_up(generate, prompts, seeds[0], warmup, warmup_size or size)
    pending, seconds, frames_made = [], 0.0, 0
    for seed in seeds:
        for index, prompt in enumerate(prompts):
            start = time.perf_counter()
            frames = generate(prompt, seed, size)
            elapsed = time.perf_counter() - start
            seconds += elapsed
            frames_made += len(frames)
            pending.append((index, prompt, seed, elapsed, len(frames), scorer.submit(frames, prompt)))
            if save_dir is not None:
                save_clip(frames, save_dir / name / f"prompt{index:03d}_seed{seed}.mp4")
            log(f"[{name}] seed {seed} prompt {index + 1}/{len(prompts)}: {len(frames)} frames in {elapsed:.2f} s")
    clips = []
    for index, prompt, seed, elapsed, num_frames, future in pending:
        result = future.result()
        result.update(prompt=prompt, seed=seed, seconds=elapsed, num_frames=num_frames)
        clips.append(result)
        log(f"[{name}] seed {seed} prompt {index + 1}/{len(prompts)}: background {result['background']:.0f} colour "
            f"{result['colour']:.2f} shape {result['shape']:.2f} motion {result['motion']:.2f} identity "
            f"{result['identity']:.2f} edge sharpness {result['edge_sharpness']:.3f} | {prompt}")
    return {"clips": clips, "seconds": seconds, "frames": frames_made, "fps": ratio(frames_made, seconds)}


def time_model(
    name: str, generate: Generate, prompts: list[str], seeds: list[int], size: VideoSize, *, clips: int,
    warmup: int = 1, warmup_size: VideoSize | None = None, log=print,
) -> dict:
    """Speed only: the first ``clips`` (seed, prompt) pairs, timed; nothing measured on the frames."""
    pairs = [(seed, prompt) for seed in seeds for prompt in prompts][:clips]
    if len(pairs) < clips:
        raise ValueError(f"--speed-clips {clips} needs as many (prompt, seed) pairs, got {len(pairs)}")
    warmup_seconds = warm_up(generate, prompts, seeds[0], warmup, warmup_size or size)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times, frames_made = [], 0
    for seed, prompt in pairs:
        start = time.perf_counter()
        frames = generate(prompt, seed, size)
        times.append(time.perf_counter() - start)
        frames_made += len(frames)
        log(f"[{name}] {len(frames)} frames in {times[-1]:.2f} s ({len(frames) / times[-1]:.2f} frames/s) {prompt}")
    return {"clip_seconds": times, "seconds": float(sum(times)), "frames": frames_made,
            "fps": ratio(frames_made, sum(times)), "warmup_seconds": warmup_seconds,
            "load_average_before": load, "load_average_after": os.getloadavg()[0] if load is not None else None}


def save_clip(frames: np.ndarray, path: Path) -> None:
    from ..pipelines.video_io import Mp4Writer, to_uint8_frames

    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, fps=16) as writer:
        writer.write(to_uint8_frames(frames))


# -- outputs ----------------------------------------------------------------------------------------------------------
def _cell(stat: dict | None) -> str:
    mean = None if stat is None else stat.get("mean")
    if mean is None or not math.isfinite(mean):
        return "–"
    std = stat.get("std")
    return f"{mean:.3f} ± {std:.3f}" if std is not None and math.isfinite(std) else f"{mean:.3f}"


def _fps(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _speed_note(settings: dict) -> str:
    clips = settings.get("speed_clips")
    what = f"{clips} timed clip(s) per model" if clips else "every clip"
    return f"{settings['device']}, {what} after {settings['warmup']} warm-up clip(s)"


def _model_lines(results: dict) -> list[str]:
    lines = []
    for name, model in results["models"].items():
        spec = model["spec"]
        details = ", ".join(f"{k} {v}" for k, v in spec.items() if k not in ("name", "path", "parameters"))
        lines.append(f"- {name}: `{spec['path']}` ({details})")
    return lines


def paired_comparison(results: dict, first: str, second: str, key: str = "edge_sharpness") -> dict:
    """``first`` vs ``second`` on the per-clip figure ``key``, paired by (prompt, seed): how many pairs, the means,
    how often ``first`` is higher, and the one-sided sign-flip permutation p-value that it is higher on average."""
    missing = [name for name in (first, second) if name not in results["models"]]
    if missing:
        raise ValueError(f"--compare: no model {missing[0]!r} in the results (have {sorted(results['models'])})")
    clips = [{(c["prompt"], c["seed"]): c[key] for c in results["models"][name]["clips"]} for name in (first, second)]
    pairs = sorted(clips[0].keys() & clips[1].keys())
    if not pairs:
        raise ValueError(f"--compare: {first} and {second} share no (prompt, seed) clip")
    a = np.array([clips[0][p] for p in pairs])
    b = np.array([clips[1][p] for p in pairs])
    return {"first": first, "second": second, "key": key, "pairs": len(pairs), "mean_first": float(a.mean()),
            "mean_second": float(b.mean()), "first_higher": int(np.sum(a > b)),
            "p_one_sided": metrics.paired_sign_flip_p(a - b)}


def _comparison_lines(results: dict) -> list[str]:
    lines = []
    for first, second in results["settings"].get("compare") or []:
        if not {first, second} <= results["models"].keys():
            continue  # a run still making one of them
        c = paired_comparison(results, first, second)
        lines.append(
            f"- paired test, {c['key'].replace('_', ' ')}: {first} vs {second} over the same {c['pairs']} (prompt, "
            f"seed) clips: means {c['mean_first']:.4f} vs {c['mean_second']:.4f}, {first} higher in "
            f"{c['first_higher']} of {c['pairs']}; one-sided sign-flip permutation p = {c['p_one_sided']:.2g}"
        )
    return lines


def markdown_table(results: dict, speed: dict | None = None) -> str:
    """Rows = models. Quality results: adherence accuracies, ratios to ground truth, identity, frames/s (of this run
    and, with ``speed``, of a ``--speed-only`` run, models matched by name). Speed results: frames/s only."""
    s = results["settings"]
    if s.get("mode") == "speed":
        lines = [f"Speed: {s['num_frames']} frames of {s['height']}x{s['width']}; {_speed_note(s)}.", "",
                 "| model | frames/s | seconds per clip |", "|---|---|---|"]
        for name, model in results["models"].items():
            per_clip = np.mean(model["clip_seconds"]) if model.get("clip_seconds") else float("nan")
            lines.append(f"| {name} | {_fps(model['fps'])} | {_fps(per_clip)} |")
        return "\n".join(lines + [""] + _model_lines(results)) + "\n"
    if speed is not None and speed["settings"].get("mode") != "speed":
        raise ValueError("--speed-from must be the JSON of a --speed-only run")
    header = ("| model | background acc | colour acc | shape acc | motion acc | all three | edge energy ratio "
              "| edge sharpness ratio | flicker ratio | identity | frames/s (quality run) |")
    rule = "|---" * (len(TABLE_KEYS) + 2 + (speed is not None)) + "|"
    notes = [f"frames/s (quality run): {_speed_note(s)}."]
    if speed is not None:
        header += " frames/s (speed run) |"
        speed_size = speed["settings"]
        notes.append(f"frames/s (speed run): {_speed_note(speed_size)}, {speed_size['num_frames']} frames of "
                     f"{speed_size['height']}x{speed_size['width']}.")
    lines = [
        f"Prompts: {len(s['prompts'])} ({s['prompt_source']}), seeds {s['seeds']}, {s['num_frames']} frames of "
        f"{s['height']}x{s['width']}; mean ± std over seeds. " + " ".join(notes),
        "", header, rule,
    ]
    for name, model in results["models"].items():
        summary = model["summary"]
        cells = [_cell(summary.get(k)) for k in TABLE_KEYS] + [_fps(model.get("fps"))]
        if speed is not None:
            cells.append(_fps(speed["models"].get(name, {}).get("fps")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] + _model_lines(results) + _comparison_lines(results) + [
        "",
        "background acc: fraction of clips whose dominant background colour is the caption's. "
        "colour/shape/motion acc: fraction of the caption's objects recovered from the frames with that attribute "
        "right (shape and motion count as wrong when the colour is not found); all three: the object fully right. "
        "edge energy ratio: mean squared Sobel gradient of the luminance relative to ground truth (1 = as sharp; "
        "below = blurrier or fewer edges, e.g. a missing object; well above = noise or artefacts). edge sharpness "
        "ratio: gradient-weighted mean gradient (~ contrast / edge width, after a 3x3 median that discounts pixel "
        "grain) relative to ground truth: blur, whatever the number of edges. "
        "flicker ratio: mean absolute frame-to-frame change relative to ground truth (1 = as much change as the "
        "true motion makes; below = too still; above = flicker or jumps). identity: fraction of frames where the "
        "object is found with a size consistent with its fitted size track.",
    ]
    return "\n".join(lines) + "\n"


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _finite_or_none(obj):
    """NaN/inf -> None, so that the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename: a run killed mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_outputs(results: dict, out: Path, markdown: Path | None, speed: dict | None) -> str:
    """The JSON (strict: NaN -> null) and the table; returns the table."""
    _write_atomically(out, json.dumps(_finite_or_none(json.loads(json.dumps(results, default=_json_default))),
                                      indent=1))
    table = markdown_table(results, speed)
    if markdown is not None:
        _write_atomically(markdown, table)
    return table


def read_results(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not JSON: {error}") from None
    if not isinstance(data, dict) or "settings" not in data or "models" not in data:
        raise ValueError(f"{what} {path} is not a results file of this command")
    return data


# -- command line -----------------------------------------------------------------------------------------------------
def parse_comparison(text: str) -> list[str]:
    """"FIRST:SECOND" -> [FIRST, SECOND] (two model names)."""
    names = text.split(":")
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise ValueError(f"--compare takes FIRST:SECOND, two different model names, got {text!r}")
    return names


def check_video_size(size: VideoSize, what: str = "--num-frames/--height/--width") -> None:
    """The world's size rule (:func:`.world.check_size`), the error naming the options."""
    try:
        world.check_size(size.num_frames, size.height, size.width)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oneforcing.training.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Model options: transformer=DIR_OR_FILE, sampler=rollout|teacher, steps=N, first_block_steps=N, "
               "frames_per_block=K, guidance=G, shift=S (teacher). See the module docstring.",
    )
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH[:key=value,...]",
                        help=f"a OneForcingPipeline folder or {GROUND_TRUTH!r}; repeat for several models")
    parser.add_argument("--prompts", default="heldout",
                        help="'heldout' (combinations never trained on), 'seen' (combinations trained on) or a text "
                             "file of world captions")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-seed", type=int, default=0,
                        help="which held-out / seen prompts (world.split_prompts)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-frames", type=int, default=81, help="1 + 4k")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="prompt tokens (default: the pipeline config's max_sequence_length if recorded, else 512;"
                             " use what the model was trained with: the demo recipe encodes 32)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when torch sees a GPU, else cpu), cpu, cuda:1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a CPU that other jobs keep busy, fewer threads "
                             "than cores avoid the stalls of threads waiting on each other")
    parser.add_argument("--warmup", type=int, default=1, help="untimed clips per model before timing")
    parser.add_argument("--warmup-frames", type=int, default=None,
                        help="frames of each warm-up clip (default: --num-frames; 5 is enough on a CPU)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that score clips while the next ones are generated (0: score inline)")
    parser.add_argument("--colour-tolerance", type=float, default=0.3,
                        help="largest RGB distance (0..1 units) of a pixel from a palette colour to count as it")
    parser.add_argument("--speed-only", action="store_true",
                        help="only time --speed-clips clips per model (no metrics, no ground-truth reference)")
    parser.add_argument("--speed-clips", type=int, default=1, help="timed clips per model with --speed-only")
    parser.add_argument("--speed-from", type=Path, default=None,
                        help="the JSON of a --speed-only run: its frames/s become a column of the table")
    parser.add_argument("--tabulate", action="store_true",
                        help="run nothing: re-make --markdown from --out (and --speed-from)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the models that --out already holds with the same request and settings")
    parser.add_argument("--save-videos", type=Path, default=None, help="also write every clip as DIR/NAME/*.mp4")
    parser.add_argument("--compare", action="append", default=None, metavar="FIRST:SECOND",
                        help="add a paired test of per-clip edge sharpness (FIRST sharper than SECOND) to the table; "
                             "repeatable; with --tabulate it replaces the comparisons of --out")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="results table (Markdown)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    if args.out.suffix != ".json":
        raise SystemExit(f"error: --out must be a .json file, got {args.out}")
    try:
        speed = read_results(args.speed_from, "--speed-from") if args.speed_from else None
        compare = [parse_comparison(text) for text in args.compare] if args.compare is not None else None
        if args.tabulate:
            results = read_results(args.out, "--out")
            if compare is not None:
                for first, second in compare:
                    paired_comparison(results, first, second)  # names a model the results lack: say so
                results["settings"]["compare"] = compare
            log(write_outputs(results, args.out, args.markdown, speed))
            return results
        if not args.model:
            raise ValueError("give at least one --model (or --tabulate)")
        specs = [parse_model_spec(text) for text in args.model]
        prompts = prompt_list(args.prompts, args.num_prompts, args.prompt_seed)
        size = VideoSize(args.num_frames, args.height, args.width)
        check_video_size(size)
        warmup_size = VideoSize(args.warmup_frames or size.num_frames, size.height, size.width)
        check_video_size(warmup_size, "--warmup-frames")
        if args.warmup < 0 or args.speed_clips < 1 or (args.threads is not None and args.threads < 1):
            raise ValueError("--warmup must be >= 0, --speed-clips >= 1 and --threads >= 1")
        device = resolve_device(args.device)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: --model names must differ, got {names}")
    seeds = list(dict.fromkeys(args.seeds))
    dtype = DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.startswith("cuda"):
        make_deterministic()

    # `timeout` sends SIGTERM: leave through the finally below (the worker processes are stopped; the files written
    # so far are whole, as every write is a rename)
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scorer = ClipScorer(0 if args.speed_only else args.workers, args.colour_tolerance)
    try:
        settings = {
            "mode": "speed" if args.speed_only else "quality", "prompt_source": args.prompts, "prompts": prompts,
            "seeds": seeds, "num_frames": size.num_frames, "height": size.height, "width": size.width,
            "device": device_description(device), "device_kind": device, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "warmup": args.warmup,
            "warmup_frames": warmup_size.num_frames, "colour_tolerance": args.colour_tolerance,
            "speed_clips": args.speed_clips if args.speed_only else None,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "compare": compare or [],
        }
        previous = {}
        if args.resume and args.out.is_file():
            try:
                old = read_results(args.out, "--out")
            except ValueError as error:
                raise SystemExit(f"error: --resume: {error}")
            differ = [k for k in RESUME_KEYS if old["settings"].get(k) != settings[k]]
            if differ:
                raise SystemExit(f"error: --resume: {args.out} was made with other settings ({', '.join(differ)}); "
                                 "use another --out or drop --resume")
            previous = old["models"]

        reference = None if args.speed_only else reference_figures(prompts, seeds, size)
        results = {"settings": settings, "models": {}}
        for spec in specs:
            request = {**asdict(spec), "weights": weights_fingerprint(spec)}
            if spec.name in previous and previous[spec.name].get("request") == request:
                log(f"[{spec.name}] kept from {args.out} (--resume)")
                results["models"][spec.name] = previous[spec.name]
                continue
            pipe = None
            if spec.is_ground_truth:
                generate = lambda prompt, seed, size: ground_truth_clip(prompt, seed, size)  # noqa: E731
            else:
                try:
                    pipe = load_pipeline(spec, device, dtype)
                except ValueError as error:
                    raise SystemExit(f"error: {error}")
                length = args.max_sequence_length or pipe.default_max_sequence_length
                generate = pipeline_generator(pipe, spec, length)
            log(f"[{spec.name}] {spec.path} ({spec.sampler if pipe is not None else 'world renderer'}) on {device}")
            if args.speed_only:
                run = time_model(spec.name, generate, prompts, seeds, size, clips=args.speed_clips,
                                 warmup=args.warmup, warmup_size=warmup_size, log=log)
                entry = {"request": request, "spec": spec_settings(spec, pipe), **run}
            else:
                run = evaluate_model(spec.name, generate, prompts, seeds, size, scorer=scorer, warmup=args.warmup,
                                     warmup_size=warmup_size, log=log, save_dir=args.save_videos)
                entry = {"request": request, "spec": spec_settings(spec, pipe),
                         "summary": summarise(run["clips"], reference, seeds), **run}
            if pipe is not None:
                entry["spec"]["max_sequence_length"] = length
            results["models"][spec.name] = entry
            write_outputs(results, args.out, args.markdown, speed)  # every finished model is kept
            del pipe, generate
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        scorer.close()
        signal.signal(signal.SIGTERM, previous_handler)  # a caller in the same process (a test) keeps its own
    for name, entry in previous.items():  # --resume forgets nothing: rows not asked for this time stay, last
        results["models"].setdefault(name, entry)
    table = write_outputs(results, args.out, args.markdown, speed)
    log(table)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
