"""Scaled dot-product attention on [B, L, H, D] tensors, with a selectable backend.

Backends are PyTorch's SDPA kernels under short names (``ATTENTION_BACKENDS``: "auto", "cudnn", "flash",
"efficient", "math") or any of diffusers' ``AttentionBackendName`` values: its native ones ("native",
"_native_cudnn", "_native_flash", "_native_efficient", "_native_math") are the same SDPA kernels, the others
("sage", "xformers", "flex", "_flash_3", "flash_hub", ...) run through diffusers' ``dispatch_attention_fn``. The string
"flash" keeps its meaning here (PyTorch's flash SDPA kernel); diffusers' flash-attn backend is reached with the enum
member ``AttentionBackendName.FLASH``.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "auto": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
ATTENTION_BACKENDS = tuple(_BACKENDS)
_DIFFUSERS_NATIVE = {
    AttentionBackendName.NATIVE: "auto",
    AttentionBackendName._NATIVE_CUDNN: "cudnn",
    AttentionBackendName._NATIVE_FLASH: "flash",
    AttentionBackendName._NATIVE_EFFICIENT: "efficient",
    AttentionBackendName._NATIVE_MATH: "math",
}


def check_attention_backend(name: str | AttentionBackendName) -> str | AttentionBackendName:
    """The backend to use for ``name``: one of ``ATTENTION_BACKENDS``, or a diffusers ``AttentionBackendName`` that
    runs through diffusers' dispatcher (its requirements, e.g. an installed package, are checked now)."""
    if isinstance(name, AttentionBackendName) and name in _DIFFUSERS_NATIVE:
        return _DIFFUSERS_NATIVE[name]
    if not isinstance(name, AttentionBackendName):
        if name in _BACKENDS:
            return name
        if name not in {b.value for b in AttentionBackendName}:
            choices = ", ".join(dict.fromkeys(ATTENTION_BACKENDS + tuple(b.value for b in AttentionBackendName)))
            raise ValueError(f"unknown attention backend {name!r}; choose one of {choices}")
        name = AttentionBackendName(name)
        if name in _DIFFUSERS_NATIVE:
            return _DIFFUSERS_NATIVE[name]
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    _check_attention_backend_requirements(name)
    return name


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str | AttentionBackendName = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v.

    Args:
        query: [B, Lq, H, D]; key, value: [B, Lk, H, D].
        mask: optional bool [Lq, Lk] (True = may attend).
        backend: a name :func:`check_attention_backend` returned; "auto" lets PyTorch choose.
    Returns:
        [B, Lq, H, D].
    """
    if isinstance(backend, AttentionBackendName):
        return dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend)
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
