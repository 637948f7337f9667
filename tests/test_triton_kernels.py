"""The hand-written Triton kernels match their PyTorch references: on CPU through Triton's interpreter, on a GPU
compiled; the dispatch picks them on CUDA only after a self-check, and importing oneforcing never needs triton."""

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from oneforcing.kernels import ops
from oneforcing.kernels import reference, self_check

triton = pytest.importorskip("triton")

KERNELS_FILE = Path(ops.__file__).with_name("triton_kernels.py")
EPS = 1e-6
FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=6e-2, rtol=2e-2)  # see self_check.TOLERANCES
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _load_interpreted():
    """A private copy of triton_kernels.py whose kernels run in Triton's interpreter, on CPU tensors.

    The interpreter is chosen when a kernel is decorated, so the file is executed afresh with TRITON_INTERPRET=1 set
    only for that moment; ``oneforcing.kernels.triton_kernels`` (compiled, for the GPU tests) stays untouched.
    """
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_oneforcing_triton_interpreted", KERNELS_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


@pytest.fixture(scope="module")
def interpreted():
    module = _load_interpreted()
    assert type(module._adaln_modulate_kernel).__name__ == "InterpretedFunction"
    return module


@pytest.fixture
def restore_backend():
    yield
    ops.set_fused_kernels(True)


def _inputs(batch, frames, tokens_per_frame, heads, head_dim, device="cpu", dtype=torch.float32, seed=0):
    return self_check.check_inputs(device, dtype, batch=batch, frames=frames, tokens_per_frame=tokens_per_frame,
                                   heads=heads, head_dim=head_dim, seed=seed)


# (batch, frames, tokens per frame, heads, head size): odd token counts, widths that are not powers of two
SHAPES = [(2, 3, 5, 3, 16), (1, 1, 7, 2, 24), (2, 2, 3, 1, 128)]


# -- CPU, interpreter -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope_matches_reference(interpreted, shape):
    i = _inputs(*shape)
    got = interpreted.qk_norm_rope(i["x"], i["weight_q"], i["cos"], i["sin"], i["heads"], EPS)
    want = reference.qk_norm_rope(i["x"], i["weight_q"], i["cos"], i["sin"], i["heads"], EPS)
    assert got.shape == want.shape == (shape[0], shape[1] * shape[2], shape[3], shape[4])
    torch.testing.assert_close(got, want, **FP32)
    # queries and keys in one launch, each with its own gain
    q, k = interpreted.qk_norm_rope_pair(i["x"], i["y"], i["weight_q"], i["weight_k"], i["cos"], i["sin"],
                                         i["heads"], EPS)
    torch.testing.assert_close(q, want, **FP32)
    torch.testing.assert_close(k, reference.qk_norm_rope(i["y"], i["weight_k"], i["cos"], i["sin"], i["heads"], EPS),
                               **FP32)


@pytest.mark.parametrize("shape", SHAPES)
def test_adaln_modulate_and_gated_residual_match_references(interpreted, shape):
    i = _inputs(*shape, seed=1)
    assert i["shift"].stride(1) == 3 * i["x"].shape[2]  # per-frame views of one [B, F, 3, C] tensor, as in the model
    torch.testing.assert_close(interpreted.adaln_modulate(i["x"], i["shift"], i["scale"], EPS),
                               reference.adaln_modulate(i["x"], i["shift"], i["scale"], EPS), **FP32)
    torch.testing.assert_close(interpreted.gated_residual(i["x"], i["y"], i["gate"]),
                               reference.gated_residual(i["x"], i["y"], i["gate"]), **FP32)


def test_each_frame_gets_its_own_modulation(interpreted):
    i = _inputs(2, 3, 5, 3, 16, seed=2)
    out = interpreted.adaln_modulate(i["x"], i["shift"], i["scale"], EPS)
    normed = torch.nn.functional.layer_norm(i["x"][:, 10:15], (48,), eps=EPS)  # frame 2 = tokens 10..14
    torch.testing.assert_close(out[:, 10:15], normed * (1 + i["scale"][:, 2:3]) + i["shift"][:, 2:3], **FP32)
    gated = interpreted.gated_residual(i["x"], i["y"], i["gate"])
    torch.testing.assert_close(gated[:, 5:10], i["x"][:, 5:10] + i["y"][:, 5:10] * i["gate"][:, 1:2], **FP32)


def test_strided_rows(interpreted):
    i = _inputs(2, 2, 3, 2, 16, seed=3)
    wide = torch.randn(2, 6, 80)
    x = wide[:, :, 8:40]  # rows 80 apart, unit last stride: used in place, not copied
    cos, sin = i["cos"], i["sin"]
    torch.testing.assert_close(interpreted.qk_norm_rope(x, i["weight_q"], cos, sin, 2, EPS),
                               reference.qk_norm_rope(x, i["weight_q"], cos, sin, 2, EPS), **FP32)
    torch.testing.assert_close(interpreted.gated_residual(x, wide[:, :, 40:72], i["gate"]),
                               reference.gated_residual(x, wide[:, :, 40:72], i["gate"]), **FP32)
    torch.testing.assert_close(interpreted.adaln_modulate(x.transpose(0, 1).contiguous().transpose(0, 1), i["shift"],
                                                          i["scale"], EPS),
                               reference.adaln_modulate(x, i["shift"], i["scale"], EPS), **FP32)


@pytest.mark.parametrize("shape", [(2, 12, 3, 5, 7), (1, 96, 2, 3, 4), (2, 20, 6, 5)])
@pytest.mark.parametrize("bias,silu", [(False, False), (True, True), (False, True)])
def test_channel_rms_norm_matches_reference(interpreted, shape, bias, silu):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last
    c = shape[1]
    gamma = torch.rand(c, generator=g) + 0.5
    b = torch.randn(c, generator=g) if bias else None
    got = interpreted.channel_rms_norm(x, gamma, b, c**0.5, silu)
    torch.testing.assert_close(got, reference.channel_rms_norm(x, gamma, b, c**0.5, silu), **FP32)
    assert got.stride() == x.stride()
    with pytest.raises(ValueError, match="channels-last"):
        interpreted.channel_rms_norm(x.contiguous(), gamma, b, 1.0, silu)


def test_bad_shapes_are_named(interpreted):
    i = _inputs(1, 3, 5, 2, 16)
    with pytest.raises(ValueError, match="do not split into 2 frames"):
        interpreted.gated_residual(i["x"], i["y"], i["gate"][:, :2])
    with pytest.raises(ValueError, match="rotary cos table"):
        interpreted.qk_norm_rope(i["x"], i["weight_q"], i["cos"][:4], i["sin"], 2, EPS)
    with pytest.raises(ValueError, match="heads of even size"):
        interpreted.qk_norm_rope(i["x"], i["weight_q"], i["cos"], i["sin"], 3, EPS)


def test_self_check_accepts_the_kernels_and_catches_a_wrong_one(interpreted):
    small = dict(dtypes=(torch.float32,), batch=2, frames=2, tokens_per_frame=2, heads=2, head_dim=8)
    assert self_check.mismatches(interpreted, "cpu", **small) == []

    def first_frame_gate(x, y, gate):  # a plausible bug: one gate for every frame
        return interpreted.gated_residual(x, y, gate[:, :1].expand_as(gate))

    broken = types.SimpleNamespace(**{name: getattr(interpreted, name) for name in interpreted.__all__})
    broken.gated_residual = first_frame_gate
    bad = self_check.mismatches(broken, "cpu", **small)
    assert len(bad) == 1 and bad[0].startswith("gated_residual")


def test_transformer_forward_through_the_interpreted_kernels(interpreted, monkeypatch):
    """The transformer's own call sites (its shapes, strides and per-frame modulation) work with the kernels."""
    from conftest import make_tiny_transformer

    model = make_tiny_transformer(num_layers=1)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 6, generator=g)  # 3 frames of 2x3 tokens
    text = torch.randn(1, 5, 32, generator=g)
    timestep = torch.tensor([[900.0, 500.0, 100.0]])
    with torch.no_grad():
        plain = model(latents, timestep, text, attention_mode="block_causal").sample
        for name in ("qk_norm_rope", "adaln_modulate", "gated_residual"):
            monkeypatch.setattr(ops, name, getattr(interpreted, name))
        fused = model(latents, timestep, text, attention_mode="block_causal").sample
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_kernels_compile_for_an_h100():
    """The full CUDA pipeline (to cubin for sm_90) runs without a GPU: the 1.3B block sizes build, in bf16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from oneforcing.kernels import triton_kernels as tk

    if type(tk._adaln_modulate_kernel).__name__ != "JITFunction":
        pytest.skip("TRITON_INTERPRET is set for the whole process")
    pointers = {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "shift_ptr": "*fp32", "scale_ptr": "*fp32", "gate_ptr": "*fp32"}
    for kernel, block in ((tk._qk_norm_rope_kernel, {"BLOCK_PAIRS": 1024}),
                          (tk._adaln_modulate_kernel, {"BLOCK": 2048}), (tk._gated_residual_kernel, {"BLOCK": 2048})):
        names = kernel.arg_names
        signature = {n: "constexpr" if n in block else "fp32" if n == "eps" else pointers.get(n, "*bf16")
                     if n.endswith("_ptr") else "i32" for n in names}
        try:
            source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in block.items()})
        except TypeError as err:  # ASTSource's arguments changed across triton 3.x
            pytest.skip(f"this triton's ASTSource differs: {err}")
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4, "enable_fp_fusion": True})
        except (FileNotFoundError, PermissionError) as err:  # no usable ptxas in this triton install
            pytest.skip(f"no CUDA toolchain: {err}")
        assert compiled.asm["cubin"]


def test_cpu_tensors_always_get_the_references(restore_backend):
    i = _inputs(1, 2, 3, 2, 16)
    for choice in ("triton", "compile", "auto"):
        ops.set_kernel_backend(choice)
        assert torch.equal(ops.gated_residual(i["x"], i["y"], i["gate"]),
                           reference.gated_residual(i["x"], i["y"], i["gate"]))
        assert ops.active_kernels("cpu") == "reference"
    ops.set_kernel_backend("reference")
    assert ops.active_kernels() == "reference" and not ops.fused_kernels_enabled()
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        ops.set_kernel_backend("cuda")


def test_oneforcing_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import torch, oneforcing\n"
        "from oneforcing.kernels import ops\n"
        "x = torch.randn(1, 4, 8)\n"
        "out = ops.gated_residual(x, x, torch.ones(1, 2, 8))\n"
        "assert torch.equal(out, x + x) and 'oneforcing.kernels.triton_kernels' not in sys.modules\n"
        "print(ops.active_kernels('cpu'), ops._triton_importable())\n"
    )
    env = {**os.environ, "ONEFORCING_KERNELS": "triton"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reference", "False"]


# -- GPU, compiled ----------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("shape", [(1, 3, 1560, 12, 128), (2, 2, 37, 3, 16), (1, 4, 1560, 12, 128)])
def test_gpu_kernels_match_references_in_bf16(shape):
    from oneforcing.kernels import triton_kernels

    i = _inputs(*shape, device="cuda", dtype=torch.bfloat16, seed=4)
    got = self_check.outputs(triton_kernels, i)
    want = self_check.outputs(reference, i)
    for name in want:
        assert got[name].dtype == torch.bfloat16, name
        torch.testing.assert_close(got[name].float(), want[name].float(), **BF16, msg=name)


@cuda
def test_gpu_dispatch_selects_triton_after_its_self_check(restore_backend):
    ops.set_kernel_backend("auto")
    assert ops.active_kernels() == "triton"
    assert ops.fused_kernels_enabled()
    i = _inputs(1, 3, 40, 2, 32, device="cuda", dtype=torch.bfloat16)
    from oneforcing.kernels import triton_kernels

    assert torch.equal(ops.adaln_modulate(i["x"], i["shift"], i["scale"], EPS),
                       triton_kernels.adaln_modulate(i["x"], i["shift"], i["scale"], EPS))
    # calls that need gradients take the compiled references, which have a backward
    x = i["x"].float().requires_grad_()
    ops.gated_residual(x, i["y"].float(), i["gate"]).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@cuda
def test_gpu_transformer_forward_with_triton_kernels(restore_backend):
    from conftest import make_tiny_transformer

    model = make_tiny_transformer(num_attention_heads=4, attention_head_dim=64, num_layers=3).cuda().to(torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 16, 3, 16, 20, device="cuda", generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, 16, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    timestep = torch.tensor([[900.0, 500.0, 100.0]], device="cuda")

    def forward(backend):
        ops.set_kernel_backend(backend)
        with torch.no_grad():
            return model(latents, timestep, text, attention_mode="block_causal").sample.float()

    plain = forward("reference")
    fast = forward("triton")
    assert ops.active_kernels() == "triton"
    assert (fast - plain).abs().max() < 0.1 * plain.abs().max()
    assert (fast - plain).abs().mean() < 0.02 * plain.abs().mean() + 1e-3
