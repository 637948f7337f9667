"""Named choices that the CLI and the ComfyUI nodes both offer: timestep presets and weight dtypes.

The CLI spells a preset with hyphens (``--timesteps first-block-four-steps``), the nodes with spaces (``first block
four steps``, the value saved in workflows); both are the same entry of :data:`TIMESTEP_PRESETS`.
"""

from __future__ import annotations

import torch

TIMESTEP_PRESETS = {
    # name -> (denoising_timesteps of every block, first_block_timesteps or None), un-warped as the scheduler takes them
    "one step": ([1000], None),
    "first block four steps": ([1000], [1000, 750, 500, 250]),
    "four steps": ([1000, 750, 500, 250], None),
}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""Weight dtypes by name; ``"default"`` (see :func:`resolve_dtype`) is offered beside them."""
STORAGE_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn}
"""Weight-only storage dtypes by name (ComfyUI's spelling): weights kept so, computed in the default dtype."""
DTYPE_CHOICES = ("default", *DTYPES, *STORAGE_DTYPES)


def cli_name(preset: str) -> str:
    """A preset's name as a command-line choice: ``first block four steps`` -> ``first-block-four-steps``."""
    return preset.replace(" ", "-")


def timestep_preset(name: str) -> tuple[list[int], list[int] | None]:
    """(denoising_timesteps, first_block_timesteps or None) of the preset ``name``, in either spelling."""
    key = name.replace("-", " ") if isinstance(name, str) else name
    if key not in TIMESTEP_PRESETS:
        raise ValueError(f"timesteps must be one of {', '.join(TIMESTEP_PRESETS)}, got {name!r}")
    denoising, first = TIMESTEP_PRESETS[key]
    return list(denoising), None if first is None else list(first)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype of the choice ``name`` (:data:`DTYPE_CHOICES`); ``"default"`` and the storage dtypes compute
    in bfloat16 on a GPU and float32 on the CPU (CPU half precision is slow and inexact)."""
    if name == "default" or name in STORAGE_DTYPES:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name]


def storage_dtype(name: str) -> torch.dtype | None:
    """The weight storage dtype of the choice ``name``: ``torch.float8_e4m3fn`` for ``"fp8_e4m3fn"``, else None (the
    weights as the file stores them, in the compute dtype; an fp8 file stays fp8)."""
    return STORAGE_DTYPES.get(name)
