"""The causal transformer takes diffusers' torchao quantization (``quantization_config=TorchAoConfig(...)``): every
linear layer of its blocks is quantized on load and the cached rollout runs through the quantized layers.

On the CPU with torchao's int8 weight-only config (what a CPU can run); the fp8 compute config the README offers
(float8 weights and row-wise dynamic float8 activations) needs fp8 tensor cores and runs where there are some.
"""

import pytest
import torch
from conftest import make_tiny_transformer
from diffusers import TorchAoConfig
from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

from oneforcing import CausalWanTransformer3DModel, OneForcingScheduler, causal_rollout

HAS_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _rollout(model, device) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(0)
    noise = torch.randn(1, 16, 3, 8, 8, device=device, generator=gen)
    text = torch.randn(1, 8, 32, device=device, generator=gen).to(model.dtype)
    with torch.no_grad():
        blocks = causal_rollout(model, OneForcingScheduler(), noise, text, frames_per_block=1, generator=gen)
        return torch.cat([block.latents.float() for block in blocks], dim=2)


def _quantized_copy(model, folder, config, dtype):
    model.save_pretrained(folder)
    return CausalWanTransformer3DModel.from_pretrained(folder, quantization_config=TorchAoConfig(config),
                                                       torch_dtype=dtype).eval()


def _check(model, quantized, device):
    linears = [m for m in quantized.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight) is not torch.nn.Parameter for m in linears), "block linears not quantized"
    plain, quant = _rollout(model, device), _rollout(quantized, device)
    error = (quant - plain).norm() / plain.norm()
    assert 0 < error < 0.1, f"relative error {error:.4f}: 0 means the quantized layers were not used"


def test_int8_weights_on_cpu(tmp_path):
    model = make_tiny_transformer()
    _check(model, _quantized_copy(model, tmp_path, Int8WeightOnlyConfig(), torch.float32), "cpu")


@pytest.mark.skipif(not HAS_FP8, reason="fp8 compute needs a GPU with fp8 tensor cores (compute capability >= 8.9)")
def test_fp8_compute_on_gpu(tmp_path):
    model = make_tiny_transformer().to(torch.bfloat16)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantized = _quantized_copy(model, tmp_path, config, torch.bfloat16).to("cuda")
    _check(model.to("cuda"), quantized, "cuda")
