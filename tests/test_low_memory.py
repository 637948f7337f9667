"""Low memory: weight-only fp8 storage (transformer and text encoder, from files and from a loaded pipeline), fp8 files
loaded without a wider copy, LoRA on fp8 weights, and diffusers' model, block-level group and sequential CPU offload with
the pipeline."""

import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_text_encoder, make_tiny_transformer
from safetensors.torch import save_file

from oneforcing import CausalWanTransformer3DModel, OneForcingPipeline
from oneforcing.pipelines.fp8 import (
    FP8_STORAGE_DTYPE, TRANSFORMER_FP8_LAYERS, UMT5_FP8_LAYERS, dequantized_weight, fp8_layer_names, is_fp8_stored,
    quantize_weight,
)
from oneforcing.pipelines.loading import load_umt5_encoder_single_file, to_original_names

ARGS = dict(num_frames=5, height=32, width=48, output_type="latent")
FP8 = FP8_STORAGE_DTYPE


def _latents(pipe):
    return pipe("a corgi surfing a wave", generator=torch.Generator().manual_seed(0), **ARGS).frames


def _close_for_fp8(got, expected):
    """fp8 keeps 3 mantissa bits: outputs agree to a few percent of their range, never exactly."""
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def _stored_layers(model, pattern):
    return [model.get_submodule(n) for n in fp8_layer_names(model, pattern)]


def test_quantize_maps_the_largest_weight_to_the_fp8_max_and_back():
    weight = torch.randn(64, 32) * 0.02
    q, scale = quantize_weight(weight)
    assert q.dtype == FP8 and scale.shape == () and q.float().abs().max() == torch.finfo(FP8).max
    torch.testing.assert_close(q.float() * scale, weight, atol=0.07 * weight.abs().max(), rtol=0.07)


def test_pipeline_fp8_storage_halves_the_weights_and_keeps_the_output():
    pipe = make_tiny_pipeline()
    base = _latents(pipe)
    stored = _stored_layers(pipe.transformer, TRANSFORMER_FP8_LAYERS)
    bytes_before = sum(m.weight.nbytes for m in stored)
    pipe.enable_fp8_storage()
    assert all(is_fp8_stored(m) for m in stored)
    assert sum(m.weight.nbytes for m in stored) * 4 == bytes_before  # float32 -> fp8
    encoder_layers = _stored_layers(pipe.text_encoder, UMT5_FP8_LAYERS)
    assert encoder_layers and all(is_fp8_stored(m) for m in encoder_layers)
    assert not any("wo" in n for n in fp8_layer_names(pipe.text_encoder, UMT5_FP8_LAYERS))
    assert pipe.transformer.proj_out.weight.dtype == torch.float32  # head, embeddings and norms stay as they were
    _close_for_fp8(_latents(pipe), base)


def test_from_pretrained_takes_a_storage_dtype(tmp_path):
    make_tiny_pipeline().save_pretrained(tmp_path)
    pipe = OneForcingPipeline.from_pretrained(tmp_path, storage_dtype=FP8)
    assert is_fp8_stored(pipe.transformer.blocks[0].ffn.net[2])
    assert is_fp8_stored(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q)
    with pytest.raises(ValueError, match="storage_dtype"):
        OneForcingPipeline.from_pretrained(tmp_path, storage_dtype=torch.float8_e5m2)


def _scaled_fp8_comfy_file(model, path):
    """The model as ComfyUI's ``*_fp8_e4m3fn_scaled`` transformer files are: original Wan names under
    ``model.diffusion_model.``, the blocks' linear weights fp8 with a ``scale_weight`` each, a ``scaled_fp8``
    marker."""
    state_dict, scales = {}, {}
    for key, value in to_original_names(model.state_dict()).items():
        if value.ndim == 2 and key.startswith("blocks."):
            value, scales[key.removesuffix(".weight") + ".scale_weight"] = quantize_weight(value)
        state_dict["model.diffusion_model." + key] = value
    state_dict.update({"model.diffusion_model." + k: v for k, v in scales.items()})
    state_dict["scaled_fp8"] = torch.zeros(2, dtype=FP8)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return state_dict


def test_a_scaled_fp8_file_loads_without_a_wider_copy(tmp_path):
    source = make_tiny_transformer(seed=1)
    path = tmp_path / "wan_tiny_fp8_e4m3fn_scaled.safetensors"
    in_file = _scaled_fp8_comfy_file(source, path)
    model = CausalWanTransformer3DModel.from_single_file(path, num_attention_heads=2)
    layer = model.blocks[0].attn1.to_q
    assert is_fp8_stored(layer)
    assert torch.equal(layer.weight.view(torch.uint8),
                       in_file["model.diffusion_model.blocks.0.self_attn.q.weight"].view(torch.uint8))
    assert layer.scale_weight == in_file["model.diffusion_model.blocks.0.self_attn.q.scale_weight"]
    widened = CausalWanTransformer3DModel.from_single_file(path, num_attention_heads=2, storage_dtype=torch.float32)
    assert widened.blocks[0].attn1.to_q.weight.dtype == torch.float32
    torch.testing.assert_close(dequantized_weight(layer), widened.blocks[0].attn1.to_q.weight, rtol=1e-2, atol=1e-3)
    x = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close_for_fp8(model(x, torch.tensor([500.0]), text).sample, source(x, torch.tensor([500.0]), text).sample)


def test_storing_an_fp8_model_in_fp8_again_keeps_its_scales(tmp_path):
    path = tmp_path / "wan_tiny_fp8_e4m3fn_scaled.safetensors"
    in_file = _scaled_fp8_comfy_file(make_tiny_transformer(seed=1), path)
    model = CausalWanTransformer3DModel.from_single_file(path, num_attention_heads=2)
    model.enable_fp8_storage()  # e.g. from_pretrained(storage_dtype=fp8) given this transformer
    assert model.blocks[0].attn1.to_q.scale_weight == in_file["model.diffusion_model.blocks.0.self_attn.q.scale_weight"]


def test_a_full_precision_file_can_be_stored_in_fp8(tmp_path):
    source = make_tiny_transformer(seed=2)
    path = tmp_path / "wan_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = CausalWanTransformer3DModel.from_single_file(path, num_attention_heads=2, dtype=torch.bfloat16,
                                                         storage_dtype=FP8)
    assert all(is_fp8_stored(m) for m in _stored_layers(model, TRANSFORMER_FP8_LAYERS))
    assert model.dtype == torch.bfloat16 and model.blocks[0].attn1.to_q.bias.dtype == torch.bfloat16
    assert not is_fp8_stored(CausalWanTransformer3DModel.from_single_file(path, num_attention_heads=2).blocks[0]
                             .attn1.to_q)  # a float file stays float by default


def test_an_fp8_text_encoder_file_keeps_its_fp8_weights(tmp_path):
    encoder = make_tiny_text_encoder(vocab_size=40)
    state_dict = {}
    for key, value in encoder.state_dict().items():
        if key == "encoder.embed_tokens.weight":  # tied to shared.weight
            continue
        if value.ndim == 2 and ".block." in key:
            value, state_dict[key.removesuffix(".weight") + ".scale_weight"] = quantize_weight(value)
        state_dict[key] = value.contiguous()
    save_file(state_dict, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    loaded = load_umt5_encoder_single_file(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    assert is_fp8_stored(loaded.encoder.block[1].layer[1].DenseReluDense.wi_0)
    assert loaded.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # widened (see fp8.py)
    ids = torch.tensor([[5, 6, 7, 1, 0]])
    with torch.no_grad():
        _close_for_fp8(loaded(ids).last_hidden_state, encoder(ids).last_hidden_state)


def test_lora_on_fp8_weights_runs_unfused_and_fusing_is_refused():
    from test_lora import in_layout, make_adapter

    full, stored = make_tiny_pipeline(), make_tiny_pipeline()
    stored.enable_fp8_storage()
    adapter = in_layout(make_adapter(full.transformer), "diffusers")
    for pipe in (full, stored):
        pipe.load_lora_weights(adapter, adapter_name="style")
    assert stored.transformer.blocks[0].attn1.to_q.lora_A["style"].weight.dtype == torch.float32  # compute dtype
    _close_for_fp8(_latents(stored), _latents(full))
    with pytest.raises(ValueError, match="fp8"):
        stored.fuse_lora()


def test_model_cpu_offload_runs_the_components_through_the_hooks():
    """On a CPU machine the execution device is the offload device: the hooks run and the video is the same."""
    base = _latents(make_tiny_pipeline())
    pipe = make_tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    calls = []
    for name in ("text_encoder", "transformer"):
        getattr(pipe, name).register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    cache_devices = []
    latents = pipe("a corgi surfing a wave", generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=lambda p, i, t, kw: cache_devices.append(p.kv_cache.device) or {}, **ARGS).frames
    assert torch.equal(latents, base)
    assert calls[0] == "text_encoder" and "transformer" in calls
    assert cache_devices and {d.type for d in cache_devices} == {pipe._execution_device.type}  # KV cache there


def test_block_level_group_offload_calls_each_block_through_its_hooks():
    """Group offload moves a block's weights when the block is called: the causal forward calls every block (of the
    transformer and of the text encoder) as a module. On CPU onload and offload devices are the same."""
    base = _latents(make_tiny_pipeline())
    pipe = make_tiny_pipeline()
    pipe.enable_group_offload(torch.device("cpu"), torch.device("cpu"))
    called = set()
    for index, block in enumerate(pipe.transformer.blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: called.add(index))
    assert torch.equal(_latents(pipe), base)
    assert called == set(range(len(pipe.transformer.blocks)))
    with pytest.raises(NotImplementedError, match="block_level"):
        make_tiny_pipeline().enable_group_offload(torch.device("cpu"), offload_type="leaf_level")


def test_sequential_cpu_offload_runs_the_causal_forward_through_per_module_hooks():
    """diffusers' sequential offload (accelerate's per-module hooks: a module's weights exist only while it runs)
    leaves the VAE resident; the causal forward then calls the q/k norms as modules instead of reading their gains.
    On a CPU machine diffusers asks accelerate for device "cpu:0", which accelerate's hooks cannot offload back to
    (an upstream limit), so the run applies accelerate's ``cpu_offload`` per component as diffusers does, on "cpu"."""
    from accelerate import cpu_offload

    pipe = make_tiny_pipeline()
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.transformer.blocks[0].attn1.norm_q.weight.device.type == "meta"
    assert pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.device.type == "meta"
    assert pipe.vae.decoder.conv_in.weight.device.type == "cpu"  # excluded: decoded between the transformer's blocks

    base = _latents(make_tiny_pipeline())
    pipe = make_tiny_pipeline()
    for name in ("text_encoder", "transformer"):
        model = getattr(pipe, name)
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert pipe.transformer.blocks[0].attn1.norm_q.weight.device.type == "meta"
    torch.testing.assert_close(_latents(pipe), base, atol=1e-5, rtol=1e-5)
