"""A quick comparison of a kernel implementation against :mod:`.reference` on small, awkward inputs.

Run once before an implementation is trusted (a broken driver, compiler or GPU model shows up here, not as a wrong
video). The inputs exercise what the real shapes need: widths that are not powers of two, several frames with
different modulation each, batch 2, and per-frame vectors that are strided views (as the transformer passes them).
"""

from __future__ import annotations

import torch

from . import reference

# (atol, rtol) per activation dtype. bf16: the normalised q/k row is rounded before rotating it; one flipped rounding
# of a value in [4, 8) is 1/32, which a cancelling rotation can leave as the whole error of an output near zero.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 2e-2), torch.float16: (8e-3, 4e-3)}


def check_inputs(device, dtype, batch=2, frames=3, tokens_per_frame=7, heads=3, head_dim=16, seed=0) -> dict:
    """Small random inputs for every kernel: x, y [B, L, C]; shift, scale, gate [B, F, C] float32 strided views;
    weight_q, weight_k [C]; cos, sin [L, D/2] float32; vae_x [B, C', F, L/F, 3] channels-last, vae_gamma, vae_bias
    [C']."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    width = heads * head_dim
    length = frames * tokens_per_frame
    x = torch.randn(batch, length, width, generator=g).to(device, dtype)
    y = torch.randn(batch, length, width, generator=g).to(device, dtype)
    modulation = torch.randn(batch, frames, 3, width, generator=g).to(device)  # unbind(2) gives strided views
    shift, scale, gate = modulation.unbind(2)
    weight_q = (torch.rand(width, generator=g) + 0.5).to(device, dtype)
    weight_k = (torch.rand(width, generator=g) + 0.5).to(device, dtype)
    angles = torch.rand(length, head_dim // 2, generator=g).to(device) * 6.3
    # VAE activations [B, C, T, H, W] in channels-last memory order, C not a power of two
    channels = heads * 5
    vae_x = torch.randn(batch, frames, tokens_per_frame, 3, channels, generator=g).to(device, dtype)
    vae_gamma = (torch.rand(channels, generator=g) + 0.5).to(device, dtype)
    vae_bias = torch.randn(channels, generator=g).to(device, dtype)
    return dict(x=x, y=y, shift=shift, scale=scale, gate=gate, weight_q=weight_q, weight_k=weight_k,
                cos=angles.cos(), sin=angles.sin(), heads=heads, vae_x=vae_x.permute(0, 4, 1, 2, 3),
                vae_gamma=vae_gamma, vae_bias=vae_bias)


def outputs(impl, inputs: dict, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Every kernel of ``impl`` (a module with the reference's functions) applied to ``inputs``."""
    i = inputs
    q, k = impl.qk_norm_rope_pair(i["x"], i["y"], i["weight_q"], i["weight_k"], i["cos"], i["sin"], i["heads"], eps)
    return {
        "qk_norm_rope": impl.qk_norm_rope(i["x"], i["weight_q"], i["cos"], i["sin"], i["heads"], eps),
        "qk_norm_rope_pair.q": q,
        "qk_norm_rope_pair.k": k,
        "adaln_modulate": impl.adaln_modulate(i["x"], i["shift"], i["scale"], eps),
        "gated_residual": impl.gated_residual(i["x"], i["y"], i["gate"]),
        "channel_rms_norm": impl.channel_rms_norm(i["vae_x"], i["vae_gamma"], None, i["vae_x"].shape[1] ** 0.5, False),
        "channel_rms_norm.bias_silu": impl.channel_rms_norm(i["vae_x"], i["vae_gamma"], i["vae_bias"], 2.0, True),
    }


def mismatches(impl, device, dtypes=(torch.bfloat16, torch.float32), **shape) -> list[str]:
    """Names (with dtype and error) of the kernels of ``impl`` that disagree with the references; [] when all agree.

    ``shape``: keyword arguments of :func:`check_inputs` (batch, frames, tokens_per_frame, heads, head_dim).
    """
    bad = []
    for dtype in dtypes:
        inputs = check_inputs(device, dtype, **shape)
        atol, rtol = TOLERANCES[dtype]
        expected = outputs(reference, inputs)
        for name, got in outputs(impl, inputs).items():
            want = expected[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                bad.append(f"{name} {dtype}: got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}")
                continue
            err = (got.float() - want.float()).abs()
            if not bool((err <= atol + rtol * want.float().abs()).all()):
                bad.append(f"{name} {dtype}: max abs error {err.max().item():.3g}")
    return bad
