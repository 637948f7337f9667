"""Fused kernels for the hot elementwise work, each beside the plain PyTorch reference that defines it.

``qk_norm_rope``, ``adaln_modulate`` and ``gated_residual`` are what the transformer calls. Today they are the
references in :mod:`.reference`; a fused implementation replaces one only where it is available and enabled.
"""

from .reference import adaln_modulate, gated_residual, qk_norm_rope

__all__ = ["adaln_modulate", "gated_residual", "qk_norm_rope"]


def compile_reference_kernels() -> None:
    """Replace the three functions by ``torch.compile``'d versions of their references (fused by Inductor).

    The transformer looks them up on this module at every call, so this takes effect at once.
    """
    global adaln_modulate, gated_residual, qk_norm_rope
    import torch

    from . import reference

    adaln_modulate = torch.compile(reference.adaln_modulate, dynamic=False)
    gated_residual = torch.compile(reference.gated_residual, dynamic=False)
    qk_norm_rope = torch.compile(reference.qk_norm_rope, dynamic=False)
