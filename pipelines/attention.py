"""Scaled dot-product attention on [B, L, H, D] tensors, with a selectable PyTorch SDPA backend."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "auto": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
ATTENTION_BACKENDS = tuple(_BACKENDS)


def check_attention_backend(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return name


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v.

    Args:
        query: [B, Lq, H, D]; key, value: [B, Lk, H, D].
        mask: optional bool [Lq, Lk] (True = may attend).
        backend: one of ``ATTENTION_BACKENDS``; "auto" lets PyTorch choose.
    Returns:
        [B, Lq, H, D].
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    choice = _BACKENDS[backend]
    ctx = sdpa_kernel([choice]) if choice is not None and q.is_cuda else contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def block_causal_mask(block_sizes: Sequence[int], tokens_per_frame: int, device=None) -> torch.Tensor:
    """Bool [L, L] mask where a token sees every token of its own block and of all earlier blocks.

    ``block_sizes``: latent frames of each block in order (``BlockLayout.block_sizes()``)."""
    sizes = torch.as_tensor(list(block_sizes), device=device)
    block = torch.arange(len(sizes), device=device).repeat_interleave(sizes * tokens_per_frame)
    return block[:, None] >= block[None, :]
