"""Command line: ``python -m oneforcing generate --prompt "..." --out clip.mp4``.

The video is written to the mp4 block by block as it is generated, so an interrupted run leaves a playable file of
what was made so far.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "models" / "oneforcing-demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMESTEP_PRESETS = {
    "one-step": ([1000], None),
    "first-block-four-steps": ([1000], [1000, 750, 500, 250]),
    "four-steps": ([1000, 750, 500, 250], None),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneforcing", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="text to video, written to an mp4 as it is generated")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, type=Path, help="output .mp4 path")
    gen.add_argument("--model", type=Path, default=None,
                     help="a saved OneForcingPipeline folder or a Wan2.1 diffusers folder "
                          "(default: the demo model shipped in the package)")
    gen.add_argument("--transformer", type=Path, default=None,
                     help="a causal transformer checkpoint replacing the folder's (one_forcing.pt, self_forcing_dmd.pt, "
                          "ComfyUI/original .safetensors, or a diffusers transformer folder)")
    gen.add_argument("--num-frames", type=int, default=None, help="video frames, 1 + 4k (default: the model's)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--frames-per-block", type=int, default=None, help="1 = frame-wise, 3 = chunk-wise")
    gen.add_argument("--timesteps", choices=sorted(TIMESTEP_PRESETS), default="one-step")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fps", type=int, default=16)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="default: bfloat16 on CUDA, float32 on CPU")
    return parser


def _load_pipeline(args):
    from .pipelines import CausalWanTransformer3DModel, OneForcingPipeline

    model_dir = args.model or DEMO_MODEL_DIR
    if not Path(model_dir).is_dir():
        if args.model is None:
            raise SystemExit(f"error: the demo model is not installed at {DEMO_MODEL_DIR}; pass --model DIR")
        raise SystemExit(f"error: --model {model_dir} is not a folder")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    extra = {}
    if args.transformer is not None:
        path = args.transformer
        if path.is_dir():
            extra["transformer"] = CausalWanTransformer3DModel.from_pretrained(path, dtype=dtype)
        else:
            extra["transformer"] = CausalWanTransformer3DModel.from_single_file(path, dtype=dtype)
    pipe = OneForcingPipeline.from_pretrained(model_dir, dtype=dtype, **extra)
    return pipe.to(args.device)


def _defaults(pipe) -> dict:
    """Video size defaults: the model's recorded ones (``model_index.json``), else Wan2.1's 81 x 480 x 832."""
    recorded = getattr(pipe.config, "default_video_size", None) or {}
    return {"num_frames": 81, "height": 480, "width": 832, **recorded}


def generate(args) -> Path:
    from tqdm import tqdm

    from .pipelines.video_io import Mp4Writer

    pipe = _load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    size = _defaults(pipe)
    num_frames = args.num_frames or size["num_frames"]
    height, width = args.height or size["height"], args.width or size["width"]
    steps, first = TIMESTEP_PRESETS[args.timesteps]
    if args.out.suffix.lower() != ".mp4":
        raise SystemExit(f"error: --out must end in .mp4, got {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    stream = pipe.stream(
        args.prompt, num_frames=num_frames, height=height, width=width, frames_per_block=args.frames_per_block,
        denoising_timesteps=steps, first_block_timesteps=first, generator=generator, output_type="np",
    )
    start = time.perf_counter()
    written = 0
    with Mp4Writer(args.out, fps=args.fps) as writer, tqdm(total=num_frames, unit="frame", desc="generating") as bar:
        for frames in stream:  # [1, T_block, H, W, 3] floats in 0..1
            writer.write((frames[0] * 255).round().clip(0, 255).astype("uint8"))
            written += frames.shape[1]
            bar.update(frames.shape[1])
    seconds = time.perf_counter() - start
    print(f"wrote {written} frames ({width}x{height}) to {args.out} in {seconds:.1f} s "
          f"({written / seconds:.1f} frames/s)")
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
