"""Fused kernels for the hot elementwise work, each beside the plain PyTorch reference that defines it.

``qk_norm_rope``, ``adaln_modulate`` and ``gated_residual`` are what the transformer calls. On CUDA tensors they run
fused versions (today: the references compiled by ``torch.compile``, which emits Triton kernels); everywhere else, or
when fusing is disabled or fails to compile, the references in :mod:`.reference` run. Never required.

Disable with the environment variable ``ONEFORCING_KERNELS=0`` or ``set_fused_kernels(False)``.
"""

from __future__ import annotations

import logging
import os

import torch

from . import reference

__all__ = ["adaln_modulate", "fused_kernels_enabled", "gated_residual", "qk_norm_rope", "set_fused_kernels"]

logger = logging.getLogger(__name__)
_enabled = os.environ.get("ONEFORCING_KERNELS", "1") != "0"
_fused: dict[str, object] = {}
_broken = False


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused CUDA versions on or off for this process."""
    global _enabled
    _enabled = enabled


def fused_kernels_enabled() -> bool:
    return _enabled and not _broken


def _dispatch(name: str, x: torch.Tensor, *args):
    global _broken
    if x.is_cuda and _enabled and not _broken:
        fn = _fused.get(name)
        if fn is None:
            fn = _fused[name] = torch.compile(getattr(reference, name), dynamic=False)
        try:
            return fn(x, *args)
        except Exception as err:  # a machine without a working compiler toolchain: keep going, unfused
            _broken = True
            logger.warning("fused kernels disabled (%s: %s); using the PyTorch references", type(err).__name__, err)
    return getattr(reference, name)(x, *args)


def qk_norm_rope(x, weight, cos, sin, num_heads: int, eps: float):
    """See :func:`.reference.qk_norm_rope`."""
    return _dispatch("qk_norm_rope", x, weight, cos, sin, num_heads, eps)


def adaln_modulate(x, shift, scale, eps: float):
    """See :func:`.reference.adaln_modulate`."""
    return _dispatch("adaln_modulate", x, shift, scale, eps)


def gated_residual(x, y, gate):
    """See :func:`.reference.gated_residual`."""
    return _dispatch("gated_residual", x, y, gate)

