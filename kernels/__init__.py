"""Fused kernels for the hot elementwise work, each beside the plain PyTorch reference that defines it.

``qk_norm_rope``, ``adaln_modulate`` and ``gated_residual`` are what the transformer calls. Today they are the
references in :mod:`.reference`; a fused implementation replaces one only where it is available and enabled.
"""

from .reference import adaln_modulate, gated_residual, qk_norm_rope

__all__ = ["adaln_modulate", "gated_residual", "qk_norm_rope"]
