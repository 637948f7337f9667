"""Hand-written Triton kernels for the transformer's (and the VAE decoder's) hot elementwise work; the meaning is
:mod:`.reference`'s.

Every kernel works one token row per program: the row (the model width C, padded to a power of two and masked) is
loaded once, reduced in float32 where needed, and written once in the input dtype. Per-frame modulation vectors
([B, F, C], any strides with a unit last stride) are indexed by ``token // (L // F)``, so nothing is broadcast in
memory. The VAE's channel norm is the exception: its rows (one pixel's 96-384 channels) are short, so a program takes a
tile of them.

This module imports only torch and triton (no package-relative imports), so a test can load a second copy of the
file under ``TRITON_INTERPRET=1`` and run the same kernels on CPU tensors.

Shapes use B = batch, L = tokens, F = latent frames, C = model width, H = heads, D = head size.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["adaln_modulate", "channel_rms_norm", "gated_residual", "qk_norm_rope", "qk_norm_rope_pair"]


# -- kernels ----------------------------------------------------------------------------------------------------------
@triton.jit
def _add(a, b):
    return a + b


# ``tl.sum`` is itself a jit function of triton.language, decorated when triton was first imported; reducing with a
# combine function of this module keeps the kernels runnable by the interpreter even when triton was imported
# (compiled mode) before this module was loaded with TRITON_INTERPRET=1.
@triton.jit
def _row_sum(x):
    """Sum of a [N] block."""
    return tl.reduce(x, 0, _add)


@triton.jit
def _pairs_sum(x):
    """Sum of a [N, 2] block."""
    return tl.reduce(tl.reduce(x, 1, _add), 0, _add)


@triton.jit
def _norm_rope_row(
    x_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr, row, num_tokens, stride_xb, stride_xl, stride_cos, width, half_head, eps,
    BLOCK_PAIRS: tl.constexpr,
):
    """RMSNorm one [C] row, then rotate its channel pairs (2p, 2p+1) by the token's angle for pair p mod D/2."""
    b = row // num_tokens
    tok = row % num_tokens
    pair = tl.arange(0, BLOCK_PAIRS)
    pair_ok = pair < width // 2
    offs = pair[:, None] * 2 + tl.arange(0, 2)[None, :]  # [BLOCK_PAIRS, 2]: (even, odd) channel of each pair
    ok = pair_ok[:, None]
    x = tl.load(x_ptr + b * stride_xb + tok * stride_xl + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(_pairs_sum(x * x) / width + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # the reference rounds the normalised row to the activation dtype before rotating it
    normed = (x * rstd * w).to(out_ptr.dtype.element_ty).to(tl.float32)
    x0, x1 = tl.split(normed)
    angle = tok * stride_cos + pair % half_head
    c = tl.load(cos_ptr + angle, mask=pair_ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + angle, mask=pair_ok, other=0.0).to(tl.float32)
    out = tl.join(x0 * c - x1 * s, x0 * s + x1 * c)
    tl.store(out_ptr + row * width + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, q_out_ptr, q_w_ptr, stride_qb, stride_ql,
    k_ptr, k_out_ptr, k_w_ptr, stride_kb, stride_kl,
    cos_ptr, sin_ptr, stride_cos, num_tokens, width, half_head, eps,
    BLOCK_PAIRS: tl.constexpr,
):
    """Grid (B*L, 1 or 2): axis 1 picks the query (0) or key (1) tensor, so both go in one launch."""
    row = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        _norm_rope_row(q_ptr, q_out_ptr, q_w_ptr, cos_ptr, sin_ptr, row, num_tokens, stride_qb, stride_ql, stride_cos,
                       width, half_head, eps, BLOCK_PAIRS)
    else:
        _norm_rope_row(k_ptr, k_out_ptr, k_w_ptr, cos_ptr, sin_ptr, row, num_tokens, stride_kb, stride_kl, stride_cos,
                       width, half_head, eps, BLOCK_PAIRS)


@triton.jit
def _adaln_modulate_kernel(
    x_ptr, out_ptr, shift_ptr, scale_ptr, stride_xb, stride_xl, stride_mb, stride_mf, stride_sb, stride_sf,
    num_tokens, tokens_per_frame, width, eps,
    BLOCK: tl.constexpr,
):
    """LayerNorm (no affine) of one row, then ``* (1 + scale[frame]) + shift[frame]``."""
    row = tl.program_id(0).to(tl.int64)
    b = row // num_tokens
    tok = row % num_tokens
    frame = tok // tokens_per_frame
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    x = tl.load(x_ptr + b * stride_xb + tok * stride_xl + cols, mask=ok, other=0.0).to(tl.float32)
    mean = _row_sum(x) / width
    centred = tl.where(ok, x - mean, 0.0)
    rstd = tl.rsqrt(_row_sum(centred * centred) / width + eps)
    shift = tl.load(shift_ptr + b * stride_mb + frame * stride_mf + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_sb + frame * stride_sf + cols, mask=ok, other=0.0).to(tl.float32)
    out = centred * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr, stride_xb, stride_xl, stride_yb, stride_yl, stride_gb, stride_gf,
    num_tokens, tokens_per_frame, width,
    BLOCK: tl.constexpr,
):
    """``x + y * gate[frame]`` for one row."""
    row = tl.program_id(0).to(tl.int64)
    b = row // num_tokens
    tok = row % num_tokens
    frame = tok // tokens_per_frame
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    x = tl.load(x_ptr + b * stride_xb + tok * stride_xl + cols, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + tok * stride_yl + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gb + frame * stride_gf + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (x + y * gate).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _channel_rms_norm_kernel(
    x_ptr, out_ptr, gamma_ptr, bias_ptr, rows, channels, scale,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_ROWS rows of C channels each (channels contiguous, rows packed) per program."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ch = tl.arange(0, BLOCK_C)
    ch_ok = ch < channels
    ok = (row < rows)[:, None] & ch_ok[None, :]
    offs = row[:, None] * channels + ch[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.reduce(x * x, 1, _add))
    inv = scale / tl.maximum(norm, 1e-12)
    gamma = tl.load(gamma_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    y = x * inv[:, None] * gamma[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))  # SiLU (tl.sigmoid is a jit function: see _row_sum)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


# -- launchers --------------------------------------------------------------------------------------------------------
# Launches pass enable_fp_fusion=True explicitly: multiply-adds stay fused (Triton's current default) and Triton 3.9
# does not warn about that default changing.
def _num_warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU, not merely the current one (a no-op for CPU tensors in interpreter mode)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """A [B, L, C] tensor whose last dimension is contiguous (rows may be strided)."""
    if x.ndim != 3:
        raise ValueError(f"{name} must be [B, L, C], got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _frames(t: torch.Tensor, x: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """Check a per-frame [B, F, C] tensor against x [B, L, C]; return it (unit last stride) and L // F."""
    b, length, width = x.shape
    if t.ndim != 3 or t.shape[0] != b or t.shape[2] != width or t.shape[1] < 1:
        raise ValueError(f"{name} must be [B, F, C] = [{b}, F, {width}], got {tuple(t.shape)}")
    if length % t.shape[1]:
        raise ValueError(f"{length} tokens do not split into {t.shape[1]} frames ({name})")
    return (t if t.stride(-1) == 1 else t.contiguous()), length // t.shape[1]


def _check_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, name: str):
    b, length, width = x.shape
    if weight is None:
        raise ValueError(f"{name} needs its RMSNorm weight")
    if num_heads < 1 or width % num_heads or (width // num_heads) % 2:
        raise ValueError(f"{name} width {width} does not split into {num_heads} heads of even size")
    half = width // num_heads // 2
    if weight.shape != (width,):
        raise ValueError(f"{name} RMSNorm weight must be [{width}], got {tuple(weight.shape)}")
    for table, table_name in ((cos, "cos"), (sin, "sin")):
        if table.shape != (length, half):
            raise ValueError(
                f"rotary {table_name} table must be [L, D/2] = [{length}, {half}], got {tuple(table.shape)}"
            )
    return half


def qk_norm_rope_pair(
    q: torch.Tensor,
    k: torch.Tensor | None,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm + rotary embedding of queries and keys in one launch.

    Args:
        q, k: [B, L, H*D] projections (same shape; ``k`` may be None to process ``q`` alone).
        weight_q, weight_k: [H*D] RMSNorm gains.
        cos, sin: [L, D/2] float32 rotary tables.
    Returns:
        ([B, L, H, D], [B, L, H, D] or None), contiguous, in the inputs' dtypes.
    """
    q = _rows(q, "q")
    half = _check_rope(q, weight_q, cos, sin, num_heads, "q")
    b, length, width = q.shape
    q_out = torch.empty(b, length, num_heads, width // num_heads, device=q.device, dtype=q.dtype)
    k_out = None
    if k is not None:
        k = _rows(k, "k")
        if k.shape != q.shape:
            raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
        _check_rope(k, weight_k, cos, sin, num_heads, "k")
        k_out = torch.empty(b, length, num_heads, width // num_heads, device=k.device, dtype=k.dtype)
    if q.numel() == 0:
        return q_out, k_out
    weight_q = weight_q.contiguous()
    weight_k = weight_k.contiguous() if k is not None else weight_q
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if sin.stride(0) != cos.stride(0):
        sin = sin.contiguous()
        cos = cos.contiguous()
    kk, kk_out = (k, k_out) if k is not None else (q, q_out)
    block = triton.next_power_of_2(width // 2)
    with _on_device(q):
        _qk_norm_rope_kernel[(b * length, 1 if k is None else 2)](
            q, q_out, weight_q, q.stride(0), q.stride(1),
            kk, kk_out, weight_k, kk.stride(0), kk.stride(1),
            cos, sin, cos.stride(0), length, width, half, eps,
            BLOCK_PAIRS=block, num_warps=_num_warps(2 * block), enable_fp_fusion=True,
        )
    return q_out, k_out


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    """[B, L, H*D] -> [B, L, H, D]: RMSNorm over the whole width, then rotary embedding (see the reference)."""
    return qk_norm_rope_pair(x, None, weight, None, cos, sin, num_heads, eps)[0]


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, L, C] -> [B, L, C]: LayerNorm without affine, then per-frame ``* (1 + scale) + shift`` ([B, F, C] each)."""
    x = _rows(x, "x")
    shift, tokens_per_frame = _frames(shift, x, "shift")
    scale, scale_tokens = _frames(scale, x, "scale")
    if scale_tokens != tokens_per_frame:
        raise ValueError(
            f"shift and scale must have the same frames, got {tuple(shift.shape)} and {tuple(scale.shape)}"
        )
    b, length, width = x.shape
    out = torch.empty(b, length, width, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block = triton.next_power_of_2(width)
    with _on_device(x):
        _adaln_modulate_kernel[(b * length,)](
            x, out, shift, scale, x.stride(0), x.stride(1), shift.stride(0), shift.stride(1),
            scale.stride(0), scale.stride(1), length, tokens_per_frame, width, eps,
            BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=True,
        )
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """[B, L, C] -> [B, L, C]: ``x + y * gate`` with a per-frame gate [B, F, C], in ``x.dtype``."""
    x = _rows(x, "x")
    y = _rows(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    gate, tokens_per_frame = _frames(gate, x, "gate")
    b, length, width = x.shape
    out = torch.empty(b, length, width, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block = triton.next_power_of_2(width)
    with _on_device(x):
        _gated_residual_kernel[(b * length,)](
            x, y, gate, out, x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), gate.stride(1),
            length, tokens_per_frame, width,
            BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=True,
        )
    return out


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float,
                     silu: bool) -> torch.Tensor:
    """[B, C, ...] -> same: RMS norm over channels (+ SiLU), see the reference. Takes channels-last tensors only
    (channels innermost in memory, the rest packed: what the VAE's frame convolutions make); the output has the same
    strides."""
    if x.ndim < 2:
        raise ValueError(f"x must be [B, C, ...], got {tuple(x.shape)}")
    channels = x.shape[1]
    if not x.movedim(1, -1).is_contiguous():
        raise ValueError("channel_rms_norm takes channels-last tensors only")
    for t, name in ((gamma, "gamma"), (bias, "bias")):
        if t is not None and t.numel() != channels:
            raise ValueError(f"{name} must have {channels} values, got shape {tuple(t.shape)}")
    out = torch.empty_like(x)  # x is dense: the same strides
    if out.numel() == 0:
        return out
    rows = x.numel() // channels
    block_c = triton.next_power_of_2(channels)
    block_rows = max(1, min(64, 4096 // block_c))
    gamma = gamma.reshape(-1).contiguous()
    bias_arg = gamma if bias is None else bias.reshape(-1).contiguous()
    with _on_device(x):
        _channel_rms_norm_kernel[(triton.cdiv(rows, block_rows),)](
            x, out, gamma, bias_arg, rows, channels, float(scale),
            HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_ROWS=block_rows, BLOCK_C=block_c,
            num_warps=_num_warps(block_rows * block_c), enable_fp_fusion=True,
        )
    return out
