"""Build a complete ``OneForcingPipeline`` folder from trained parts:
``python -m oneforcing.training.assemble_demo --parts DIR --transformer DIR --out models/oneforcing-demo``.

``--parts`` holds ``tokenizer/``, ``text_encoder/`` and ``vae/`` (from :mod:`.demo_components`); ``--transformer`` is a
trained causal transformer folder (a distilled generator). The pipeline records the video size and the prompt
length it was trained with (``default_video_size``, ``max_sequence_length`` in ``model_index.json``), which the
pipeline, the CLI and the ComfyUI nodes use as defaults. The transformer's weights are stored as float16 (they load
back as float32 unless a dtype is asked for); the folder must stay within ``--max-mb``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def store_half(folder: Path) -> None:
    """Rewrite every ``*.safetensors`` file of a model folder with float16 floating-point tensors."""
    for file in folder.glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})


def assemble(
    parts: Path,
    transformer: Path,
    out: Path,
    *,
    num_frames: int,
    height: int,
    width: int,
    max_sequence_length: int,
    frames_per_block: int | None = None,
    max_megabytes: float | None = 25.0,
) -> Path:
    from diffusers import AutoencoderKLWan
    from transformers import T5Tokenizer, UMT5EncoderModel

    from ..pipelines.pipeline_one_forcing import OneForcingPipeline
    from ..pipelines.scheduling_one_forcing import OneForcingScheduler
    from ..pipelines.transformer_causal_wan import CausalWanTransformer3DModel

    for name in ("tokenizer", "text_encoder", "vae"):
        if not (parts / name).is_dir():
            raise FileNotFoundError(f"--parts {parts}: no {name}/ folder (build it with training.demo_components)")
    if not (transformer / "config.json").is_file():
        raise FileNotFoundError(f"--transformer {transformer}: not a diffusers model folder (no config.json)")
    model = CausalWanTransformer3DModel.from_pretrained(str(transformer), torch_dtype=torch.float32)
    if frames_per_block is not None:
        model.register_to_config(frames_per_block=frames_per_block)
    pipe = OneForcingPipeline(
        tokenizer=T5Tokenizer.from_pretrained(str(parts / "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(str(parts / "text_encoder")),
        transformer=model,
        vae=AutoencoderKLWan.from_pretrained(str(parts / "vae")),
        scheduler=OneForcingScheduler(),
        default_video_size={"num_frames": num_frames, "height": height, "width": width},
        max_sequence_length=max_sequence_length,
    )
    pipe.save_pretrained(str(out))
    store_half(out / "transformer")
    size = folder_megabytes(out)
    if max_megabytes is not None and size > max_megabytes:
        raise ValueError(f"{out} is {size:.1f} MB, over the {max_megabytes} MB limit")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m oneforcing.training.assemble_demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=Path, required=True, help="folder with tokenizer/, text_encoder/, vae/")
    parser.add_argument("--transformer", type=Path, required=True, help="trained causal transformer folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-sequence-length", type=int, default=32)
    parser.add_argument("--frames-per-block", type=int, default=None)
    parser.add_argument("--max-mb", type=float, default=25.0, help="size limit of the folder (0: none)")
    args = parser.parse_args(argv)
    out = assemble(args.parts, args.transformer, args.out, num_frames=args.num_frames, height=args.height,
                   width=args.width, max_sequence_length=args.max_sequence_length,
                   frames_per_block=args.frames_per_block, max_megabytes=args.max_mb or None)
    report = {"out": str(out), "megabytes": round(folder_megabytes(out), 2)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
