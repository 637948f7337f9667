"""Export a trained generator (a diffusers model folder) to the reference ``.pt`` layout.

The file is ``{"generator_ema": {"model.<original Wan2.1 key>": tensor}}``, which the One-Forcing / Self-Forcing
inference code reads, and which :meth:`CausalWanTransformer3DModel.from_single_file` reads back.
"""

from __future__ import annotations

from pathlib import Path

from ..pipelines.loading import export_reference_checkpoint, read_recorded_config
from .runner import WEIGHTS_NAME, read_weights


def export_folder(source: Path, out: Path | None = None, entry: str = "generator_ema") -> Path:
    """Write ``source``'s weights (a model folder: ``config.json`` + safetensors) as the reference ``.pt``, with its
    config recorded (the head count above all: shapes do not show it)."""
    weights = Path(source) / WEIGHTS_NAME
    if not weights.is_file() or not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"export: {source} is not a model folder written by training (it needs "
                                f"{WEIGHTS_NAME} and config.json)")
    out = out or Path(source).parent / "one_forcing.pt"
    return export_reference_checkpoint(read_weights(weights), out, entry=entry,
                                       config=read_recorded_config(source))
