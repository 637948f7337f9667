"""``python -m oneforcing.training <stage> --config FILE [section.field=value ...]``

Stages, in recipe order: ``encode`` (clips -> latent folder), ``teacher``, ``ode-pairs``, ``ode-init``, ``distill``
(``--no-gan`` for the DMD-only ablation), ``export`` (a trained generator -> the reference ``.pt`` layout). Every stage
runs unchanged under ``accelerate launch -m oneforcing.training ...`` on one CPU, one GPU or several GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("encode", "teacher", "ode-pairs", "ode-init", "distill", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oneforcing.training", description=__doc__.split("\n\n")[1].replace("``", "")
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", help="recipe file (.json or .toml); see training/configs/")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    parser.add_argument("--no-gan", action="store_true", help="distill: DMD only, no adversarial critic")
    parser.add_argument("--resume", default="auto",
                        help="auto (latest checkpoint of the stage, default), never, or a checkpoint folder")
    parser.add_argument("--source", help="export: model folder to export (default: distill/final/generator_ema)")
    parser.add_argument("--out", help="export: output .pt file (default: next to the source)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run one stage; a bad config, a damaged checkpoint or a non-finite loss ends with one ``error:`` line and exit
    status 1 (the checkpoints on disk stay the last good ones)."""
    from ..pipelines.loading import CheckpointError
    from .runner import NonFiniteTrainingError

    try:
        return run_stage(build_parser().parse_intermixed_args(argv))
    except (CheckpointError, NonFiniteTrainingError) as error:
        sys.exit(f"error: {error}")


def run_stage(args) -> dict:
    from .config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.config is None and args.stage != "export" and not any(o.startswith("output_dir=") for o in overrides):
        sys.exit("error: give --config FILE (or output_dir=DIR): without either the stage would write into "
                 "runs/default/ under the current folder")
    if args.no_gan:
        overrides.append("distill.gan.enabled=false")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    if args.stage == "encode":
        from .encode import encode_latents

        return encode_latents(config)
    if args.stage == "teacher":
        from .teacher import train_teacher

        return train_teacher(config, args.resume)
    if args.stage == "ode-pairs":
        from .ode import generate_ode_pairs

        return generate_ode_pairs(config)
    if args.stage == "ode-init":
        from .ode import train_ode_init

        return train_ode_init(config, args.resume)
    if args.stage == "distill":
        from .distill import train_distill

        return train_distill(config, args.resume)
    from .export import export_folder

    source = Path(args.source) if args.source else config.stage_dir("distill") / "final" / "generator_ema"
    out = export_folder(source, Path(args.out) if args.out else None)
    print(json.dumps({"exported": str(out)}))
    return {"exported": str(out)}


if __name__ == "__main__":
    main()
