"""The kernels' dispatch falls back to the PyTorch references off CUDA; on a GPU the fused versions match them."""

import pytest
import torch

from oneforcing.kernels import ops
from oneforcing.kernels import reference


def _inputs(device, dtype, batch=1, frames=3, tokens=40, heads=2, head_dim=32):
    g = torch.Generator(device="cpu").manual_seed(0)
    width = heads * head_dim
    x = torch.randn(batch, frames * tokens, width, generator=g).to(device, dtype)
    y = torch.randn(batch, frames * tokens, width, generator=g).to(device, dtype)
    per_frame = [torch.randn(batch, frames, width, generator=g).to(device) for _ in range(3)]
    weight = torch.rand(width, generator=g).to(device, dtype) + 0.5
    angles = torch.rand(frames * tokens, head_dim // 2, generator=g).to(device) * 6
    return x, y, per_frame, weight, angles.cos(), angles.sin()


def test_cpu_uses_the_references_exactly():
    x, y, (shift, scale, gate), weight, cos, sin = _inputs("cpu", torch.float32)
    assert torch.equal(ops.adaln_modulate(x, shift, scale, 1e-6), reference.adaln_modulate(x, shift, scale, 1e-6))
    assert torch.equal(ops.gated_residual(x, y, gate), reference.gated_residual(x, y, gate))
    assert torch.equal(ops.qk_norm_rope(x, weight, cos, sin, 2, 1e-6),
                       reference.qk_norm_rope(x, weight, cos, sin, 2, 1e-6))


def test_reference_semantics():
    x, y, (shift, scale, gate), weight, cos, sin = _inputs("cpu", torch.float32, frames=2, tokens=3)
    out = reference.adaln_modulate(x, shift, scale, 1e-6)
    normed = torch.nn.functional.layer_norm(x[:, 3:6], (64,), eps=1e-6)  # frame 1's tokens use frame 1's vectors
    assert torch.allclose(out[:, 3:6], normed * (1 + scale[:, 1:2]) + shift[:, 1:2], atol=1e-6)
    assert torch.allclose(reference.gated_residual(x, y, gate)[:, :3], x[:, :3] + y[:, :3] * gate[:, :1], atol=1e-6)
    rotated = reference.qk_norm_rope(x, weight, torch.ones_like(cos), torch.zeros_like(sin), 2, 1e-6)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight  # zero angles: RMSNorm only
    assert torch.allclose(rotated.flatten(2), rms, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cuda_kernels_match_references(dtype):
    ops.set_fused_kernels(True)
    x, y, (shift, scale, gate), weight, cos, sin = _inputs("cuda", dtype, frames=3, tokens=1560, heads=12,
                                                           head_dim=128)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    pairs = [
        (ops.adaln_modulate(x, shift, scale, 1e-6), reference.adaln_modulate(x, shift, scale, 1e-6)),
        (ops.gated_residual(x, y, gate), reference.gated_residual(x, y, gate)),
        (ops.qk_norm_rope(x, weight, cos, sin, 12, 1e-6), reference.qk_norm_rope(x, weight, cos, sin, 12, 1e-6)),
    ]
    assert ops.fused_kernels_enabled()
    for fused, plain in pairs:
        assert fused.dtype == plain.dtype
        torch.testing.assert_close(fused.float(), plain.float(), **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_optimised_rollout_within_bf16_tolerance_of_plain():
    from conftest import make_tiny_transformer

    from oneforcing import OneForcingScheduler, causal_rollout

    model = make_tiny_transformer(num_attention_heads=4, attention_head_dim=64, num_layers=3).cuda().to(torch.bfloat16)
    noise = torch.randn(1, 16, 6, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    text = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)

    def run(fused, fuse_pass, backend):
        ops.set_fused_kernels(fused)
        model.set_attention_backend(backend)
        with torch.no_grad():
            blocks = causal_rollout(model, OneForcingScheduler(), noise, text, frames_per_block=1,
                                    fuse_context_pass=fuse_pass, generator=torch.Generator("cuda").manual_seed(1))
            return torch.cat([b.latents for b in blocks], 2).float()

    plain = run(False, False, "math")
    fast = run(True, True, "auto")
    ops.set_fused_kernels(True)
    assert (fast - plain).abs().max() < 0.1 * plain.abs().max()
    assert (fast - plain).abs().mean() < 0.02 * plain.abs().mean() + 1e-3
