"""Export a trained generator (a diffusers model folder) to the reference ``.pt`` layout, or a LoRA run's adapter to
a Wan LoRA file.

The reference file is ``{"generator_ema": {"model.<original Wan2.1 key>": tensor}}``, which the One-Forcing /
Self-Forcing inference code reads, and which :meth:`CausalWanTransformer3DModel.from_single_file` reads back.

A LoRA file is in the original Wan layout (``diffusion_model.<original layer>.lora_A/lora_B.weight``, alpha folded
in): the layout Wan LoRAs ship in, read by ComfyUI's LoRA loaders and diffusers' ``load_lora_weights`` alike.
"""

from __future__ import annotations

from pathlib import Path

import json

from safetensors.torch import save_file

from ..pipelines.atomic import replaced_on_success
from ..pipelines.loading import export_reference_checkpoint, read_recorded_config
from ..pipelines.lora import wan_lora_file_tensors
from .runner import ADAPTER_CONFIG, WEIGHTS_NAME, read_weights


def export_folder(source: Path, out: Path | None = None, entry: str = "generator_ema") -> Path:
    """Write ``source``'s weights (a model folder: ``config.json`` + safetensors) as the reference ``.pt``, with its
    config recorded (the head count above all: shapes do not show it)."""
    weights = Path(source) / WEIGHTS_NAME
    if not weights.is_file() or not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"export: {source} is not a model folder written by training (it needs "
                                f"{WEIGHTS_NAME} and config.json)")
    if (Path(source) / ADAPTER_CONFIG).is_file():
        return export_lora(source, out or Path(source).parent / "lora.safetensors")
    out = out or Path(source).parent / "one_forcing.pt"
    return export_reference_checkpoint(read_weights(weights), out, entry=entry,
                                       config=read_recorded_config(source))


def export_lora(source: Path, out: Path) -> Path:
    """Write the adapter of a LoRA run's model folder as a Wan LoRA ``.safetensors`` (float32, strength 1)."""
    from peft import LoraConfig

    settings = LoraConfig.from_pretrained(str(source))
    tensors = wan_lora_file_tensors(read_weights(Path(source) / WEIGHTS_NAME), scale=settings.lora_alpha / settings.r)
    metadata = {"format": "pt", "rank": str(settings.r), "targets": json.dumps(sorted(settings.target_modules))}
    with replaced_on_success(Path(out)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(out)
