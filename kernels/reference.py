"""Plain PyTorch definitions of the hot elementwise work in the causal Wan transformer and the Wan VAE decoder.

These functions *define* the math. The fused GPU kernels in this package must match them (within the rounding of
the activation dtype), and the transformer falls back to them wherever a fused kernel is unavailable.

Shapes use B = batch, L = tokens, F = latent frames, C = model width, H = heads, D = head size.
Tokens are frame-major, so token ``l`` belongs to frame ``l // (L // F)``.
"""

from __future__ import annotations

import torch


def _per_frame(t: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, F, C] -> [B, L, C] view-broadcast (each frame's vector repeated over its L // F tokens)."""
    b, f, c = t.shape
    if num_tokens % f:
        raise ValueError(f"{num_tokens} tokens do not split into {f} frames")
    return t[:, :, None, :].expand(b, f, num_tokens // f, c).reshape(b, num_tokens, c)


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    """RMSNorm over the whole width, split into heads, rotate adjacent channel pairs.

    Args:
        x: [B, L, H*D] query or key projections.
        weight: [H*D] RMSNorm gain.
        cos, sin: [L, D/2] float32 rotary tables, one angle per channel pair and token.
    Returns:
        [B, L, H, D] in ``x.dtype``.
    """
    xf = x.float()
    return rope((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype), cos, sin,
                num_heads)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split into heads and rotate adjacent channel pairs (the second half of :func:`qk_norm_rope`).

    Args:
        x: [B, L, H*D] normalised query or key projections.
        cos, sin: [L, D/2] float32 rotary tables.
    Returns:
        [B, L, H, D] in ``x.dtype``.
    """
    b, l, _ = x.shape
    x0, x1 = x.float().view(b, l, num_heads, -1, 2).unbind(-1)
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.view(b, l, num_heads, -1).to(x.dtype)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then per-frame ``* (1 + scale) + shift``; computed in float32.

    Args:
        x: [B, L, C] hidden states.
        shift, scale: [B, F, C] float32 modulation, one vector per latent frame.
    Returns:
        [B, L, C] in ``x.dtype``.
    """
    normed = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    n = x.shape[1]
    return (normed * (1 + _per_frame(scale, n)) + _per_frame(shift, n)).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` with a per-frame gate, computed in float32.

    Args:
        x: [B, L, C] residual stream. y: [B, L, C] branch output. gate: [B, F, C] float32.
    Returns:
        [B, L, C] in ``x.dtype``.
    """
    return (x.float() + y.float() * _per_frame(gate, x.shape[1])).to(x.dtype)


def qk_norm_rope_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope` of queries and keys (each with its own gain); fused versions do both in one launch."""
    return qk_norm_rope(q, weight_q, cos, sin, num_heads, eps), qk_norm_rope(k, weight_k, cos, sin, num_heads, eps)


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float,
                     silu: bool) -> torch.Tensor:
    """The Wan VAE's RMS norm over channels, ``x / max(||x||_2, 1e-12) * scale * gamma + bias`` (``scale`` is
    sqrt(C) there), optionally followed by SiLU; computed in float32, rounded once.

    Args:
        x: [B, C, ...] activations (any memory layout; the output keeps it).
        gamma: [C] gain. bias: [C] or None.
    Returns:
        [B, C, ...] in ``x.dtype``.
    """
    view = (1, -1) + (1,) * (x.ndim - 2)
    out = torch.nn.functional.normalize(x.float(), dim=1) * scale * gamma.float().reshape(view)
    if bias is not None:
        out = out + bias.float().reshape(view)
    if silu:
        out = torch.nn.functional.silu(out)
    return out.to(x.dtype)
