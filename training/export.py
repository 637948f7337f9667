"""Export a trained generator (a diffusers model folder) to the reference ``.pt`` layout.

The file is ``{"generator_ema": {"model.<original Wan2.1 key>": tensor}}``, which the One-Forcing / Self-Forcing
inference code reads, and which :meth:`CausalWanTransformer3DModel.from_single_file` reads back.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ..pipelines.loading import export_reference_checkpoint
from .runner import WEIGHTS_NAME


def export_folder(source: Path, out: Path | None = None, entry: str = "generator_ema") -> Path:
    weights = Path(source) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"export: {weights} is missing (source must be a model folder written by training)")
    out = out or Path(source).parent / "one_forcing.pt"
    return export_reference_checkpoint(load_file(str(weights)), out, entry=entry)
