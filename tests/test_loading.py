"""Checkpoint layouts: every supported layout loads to identical weights; bad files give clear errors naming the file.

Tiny real models (diffusers ``WanTransformer3DModel`` / ``AutoencoderKLWan``, transformers ``UMT5EncoderModel``) are
written in each layout a user may hold, then read back through ``oneforcing.pipelines.loading``.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRANSFORMER, make_tiny_text_encoder, make_tiny_vae
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file
from transformers import UMT5EncoderModel

from oneforcing import CausalWanTransformer3DModel
from oneforcing.pipelines.loading import (
    CheckpointError,
    check_state_dict_matches,
    export_reference_checkpoint,
    infer_transformer_config,
    infer_wan_vae_config,
    load_transformer,
    load_transformer_state_dict,
    load_umt5_encoder_single_file,
    load_wan_vae_single_file,
    to_diffusers_names,
    to_original_names,
)

FIXTURES = Path(__file__).parent / "fixtures"
FP8 = torch.float8_e4m3fn


def _wan(seed=7, **overrides):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}).eval()


@pytest.fixture(scope="module")
def reference():
    return {k: v.clone() for k, v in _wan().state_dict().items()}


def _assert_same(loaded, expected, label=""):
    assert set(loaded) == set(expected), (label, sorted(set(loaded) ^ set(expected))[:5])
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), (label, key)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _raises(problem: str, path, fn, /, *args, **kwargs) -> CheckpointError:
    """``fn`` raises a CheckpointError whose message names ``path`` (its file name) and matches ``problem``."""
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert Path(path).name in message, message
    assert re.search(problem, message), message
    return info.value


# -- transformer layouts -------------------------------------------------------------------------------------------
def _write_transformer_layouts(folder: Path, sd: dict) -> dict[str, Path]:
    original = to_original_names(sd)
    paths = {"one_forcing_pt": export_reference_checkpoint(sd, folder / "one_forcing.pt", config=TINY_TRANSFORMER)}

    paths["self_forcing_generator_pt"] = folder / "self_forcing_generator.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in original.items()}, "critic": {"model.x": torch.zeros(1)}},
               paths["self_forcing_generator_pt"])

    paths["model_entry_pt"] = folder / "ode_init.pt"
    torch.save({"model": {f"model.{k}": v for k, v in original.items()}}, paths["model_entry_pt"])

    # FSDP with nested wrapping and activation checkpointing leaves wrapper segments inside the keys too
    def fsdp(key):
        key = re.sub(r"^(blocks\.\d+)\.", r"\1._fsdp_wrapped_module._checkpoint_wrapped_module.", key)
        return f"model._fsdp_wrapped_module.{key}"

    paths["fsdp_pt"] = folder / "fsdp_ema.pt"
    torch.save({"generator_ema": {fsdp(k): v for k, v in original.items()}}, paths["fsdp_pt"])

    paths["original_pth"] = folder / "wan_original.pth"
    torch.save(original, paths["original_pth"])
    paths["original_safetensors"] = folder / "wan_original.safetensors"
    save_file(original, paths["original_safetensors"])
    paths["comfyui_safetensors"] = folder / "wan2.1_t2v_comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, paths["comfyui_safetensors"])
    paths["comfyui_short_prefix"] = folder / "wan2.1_t2v_comfy_short.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in original.items()}, paths["comfyui_short_prefix"])
    paths["diffusers_safetensors"] = folder / "diffusers.safetensors"
    save_file(sd, paths["diffusers_safetensors"])
    paths["lightning_ckpt"] = folder / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in original.items()}, "epoch": 3}, paths["lightning_ckpt"])

    # the original Wan2.1-T2V-1.3B folder: the transformer beside the VAE and T5 .pth files
    paths["original_wan_folder"] = folder / "Wan2.1-T2V-1.3B"
    paths["original_wan_folder"].mkdir()
    save_file(original, paths["original_wan_folder"] / "diffusion_pytorch_model.safetensors")
    for other in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        torch.save({"x": torch.zeros(1)}, paths["original_wan_folder"] / other)

    keys = sorted(sd)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    (folder / "sharded").mkdir()
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, folder / "sharded" / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    paths["sharded_index"] = folder / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    paths["sharded_index"].write_text(json.dumps(index))
    paths["sharded_folder"] = folder / "sharded"

    # diffusers' own transformer/ folders, single file and sharded
    model = _wan()
    model.save_pretrained(folder / "transformer")
    model.save_pretrained(folder / "transformer_sharded", max_shard_size="100KB")
    assert len(list((folder / "transformer_sharded").glob("*.safetensors"))) > 1
    paths["diffusers_folder"] = folder / "transformer"
    paths["diffusers_sharded_folder"] = folder / "transformer_sharded"
    return paths


def test_every_transformer_layout_loads_identical_weights(tmp_path, reference):
    for layout, path in _write_transformer_layouts(tmp_path, reference).items():
        _assert_same(load_transformer_state_dict(path), reference, layout)


def test_causal_model_from_single_file_uses_the_loader(tmp_path, reference):
    for name in ("one_forcing.pt", "wan2.1_t2v_comfy.safetensors"):
        paths = {p.name: p for p in _write_transformer_layouts(tmp_path / name.replace(".", "_"), reference).values()}
        model = CausalWanTransformer3DModel.from_single_file(paths[name], num_attention_heads=2)
        _assert_same(model.state_dict(), reference, name)
    bigger = _wan(ffn_dim=96).state_dict()
    save_file(bigger, tmp_path / "other.safetensors")
    _raises(r"mismatched shapes.*ffn", tmp_path / "other.safetensors",
            CausalWanTransformer3DModel.from_single_file, tmp_path / "other.safetensors", config=dict(TINY_TRANSFORMER))


def test_ema_is_preferred_unless_asked(tmp_path, reference):
    other = {k: v + 1 for k, v in reference.items()}
    torch.save({"generator": {f"model.{k}": v for k, v in to_original_names(other).items()},
                "generator_ema": {f"model.{k}": v for k, v in to_original_names(reference).items()},
                "critic": {"model.head.head.weight": torch.zeros(3)}},
               tmp_path / "both.pt")
    _assert_same(load_transformer_state_dict(tmp_path / "both.pt"), reference)
    _assert_same(load_transformer_state_dict(tmp_path / "both.pt", prefer_ema=False), other)


def test_comfyui_fp8_and_scaled_fp8_files_are_widened(tmp_path, reference):
    original = to_original_names(reference)
    quantized, expected = {}, dict(reference)
    # scaled fp8 on every linear weight of the blocks, plain fp8 on the patch embedding, the rest untouched
    inverse = {next(iter(to_original_names({k: None}))): k for k in reference}  # original name -> diffusers name
    for key, value in original.items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / 448.0
            q = (value / scale).to(FP8)
            quantized[key], quantized[key[: -len("weight")] + "scale_weight"] = q, scale.reshape(())
            expected[inverse[key]] = (q.float() * scale).to(torch.bfloat16)
        elif key == "patch_embedding.weight":
            quantized[key] = value.to(FP8)
            expected[inverse[key]] = value.to(FP8).to(torch.bfloat16)
        else:
            quantized[key] = value
    quantized["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file({f"model.diffusion_model.{k}": v for k, v in quantized.items()}, tmp_path / "wan_fp8_scaled.safetensors")
    loaded = load_transformer_state_dict(tmp_path / "wan_fp8_scaled.safetensors")
    _assert_same(loaded, expected)
    q_weight = reference["blocks.0.attn1.to_q.weight"]
    assert torch.allclose(loaded["blocks.0.attn1.to_q.weight"].float(), q_weight, atol=0.1 * q_weight.abs().max())


def test_inferred_config_rebuilds_an_identical_model(reference):
    for overrides in ({}, {"image_dim": 48, "added_kv_proj_dim": 64}):
        model = _wan(**overrides)
        config = infer_transformer_config(model.state_dict(), num_attention_heads=2)
        rebuilt = WanTransformer3DModel(**config)
        for key, value in rebuilt.config.items():
            if not key.startswith("_"):
                assert _plain(value) == _plain(model.config[key]), key
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 5, TINY_TRANSFORMER["text_dim"], generator=torch.Generator().manual_seed(1))
        extra = {"encoder_hidden_states_image": torch.randn(1, 3, 48)} if overrides else {}
        with torch.no_grad():
            out_a = model(x, torch.tensor([500]), text, **extra).sample
            out_b = rebuilt(x, torch.tensor([500]), text, **extra).sample
        assert torch.equal(out_a, out_b)
        # the original layout (with img_emb / k_img names for the image-conditioned model) converts back key for key
        original = {f"model.{k}": v for k, v in to_original_names(model.state_dict()).items()}
        _assert_same(to_diffusers_names(original), model.state_dict())


def test_heads_come_from_the_caller_the_file_or_a_released_model():
    for heads, ffn, layers in ((12, 8960, 30), (40, 13824, 40)):  # Wan2.1 1.3B and 14B, shapes only
        with torch.device("meta"):
            real = WanTransformer3DModel(
                num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn, num_layers=layers
            )
        config = infer_transformer_config(real.state_dict())
        geometry = (config["num_attention_heads"], config["attention_head_dim"], config["num_layers"])
        assert geometry == (heads, 128, layers)
        assert config["ffn_dim"] == ffn and config["text_dim"] == 4096
        assert infer_transformer_config(real.state_dict(), num_attention_heads=2 * heads)["attention_head_dim"] == 64
    # the demo's geometry: 4 heads x 64 and 2 x 128 have the same weights, so without a record it is refused
    demo = _wan(num_attention_heads=4, attention_head_dim=64).state_dict()
    _raises("records no number of attention heads", "demo.pt", infer_transformer_config, demo, path="demo.pt")
    recorded = {"num_attention_heads": 4, "frames_per_block": 3}
    config = infer_transformer_config(demo, recorded=recorded)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["frames_per_block"]) == (4, 64, 3)
    _raises("records num_attention_heads=4, but 2", "demo.pt", infer_transformer_config, demo,
            num_attention_heads=2, recorded=recorded, path="demo.pt")
    tiny = _wan().state_dict()
    _raises("num_attention_heads", "tiny.pt", infer_transformer_config, tiny, path="tiny.pt")  # width 64
    _raises("does not divide", "tiny.pt", infer_transformer_config, tiny, num_attention_heads=3, path="tiny.pt")
    _raises("missing 'proj_out.weight'", "tiny.pt", infer_transformer_config,
            {k: v for k, v in tiny.items() if k != "proj_out.weight"}, num_attention_heads=2, path="tiny.pt")


def test_reference_fixture_loads_with_every_key_consumed():
    path = FIXTURES / "ref_tiny_oneforcing.pt"
    raw = torch.load(path, weights_only=True)["generator_ema"]
    sd = load_transformer_state_dict(path)
    assert len(sd) == len(raw) == 69
    config = infer_transformer_config(sd, num_attention_heads=2, path=path)
    truth = torch.load(FIXTURES / "ref_tiny_io.pt", weights_only=True)["config"]
    assert config["num_attention_heads"] * config["attention_head_dim"] == truth["dim"]
    assert config["num_attention_heads"] == truth["num_heads"]
    assert (config["num_layers"], config["ffn_dim"], config["text_dim"], config["freq_dim"]) == (
        truth["num_layers"], truth["ffn_dim"], truth["text_dim"], truth["freq_dim"])
    assert (config["in_channels"], config["out_channels"], list(config["patch_size"])) == (
        truth["in_dim"], truth["out_dim"], truth["patch_size"])
    model = WanTransformer3DModel(**config)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # the affine cross-attention norm (original norm3) lands in diffusers' norm2
    assert torch.equal(model.blocks[1].norm2.weight, raw["model.blocks.1.norm3.weight"])


def test_export_round_trip(tmp_path, reference):
    path = export_reference_checkpoint(reference, tmp_path / "out" / "x.pt", entry="generator", config=TINY_TRANSFORMER)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["generator", "config"] and len(raw["generator"]) == len(reference)
    assert raw["config"]["num_attention_heads"] == TINY_TRANSFORMER["num_attention_heads"]
    keys = raw["generator"]
    assert {"model.blocks.0.self_attn.q.weight", "model.head.modulation", "model.blocks.1.norm3.weight",
            "model.blocks.0.modulation", "model.time_projection.1.bias", "model.blocks.0.ffn.2.weight"} <= set(keys)
    assert not any("norm2" in k or "attn1" in k for k in keys)
    _assert_same(load_transformer_state_dict(path), reference)
    model = _wan()
    _assert_same(load_transformer_state_dict(export_reference_checkpoint(model, tmp_path / "m.pt")), model.state_dict())
    assert not list(tmp_path.rglob("*.partial*"))
    _raises("records no number of attention heads", "h.pt", export_reference_checkpoint, reference, tmp_path / "h.pt")
    _raises("is a folder", "out", export_reference_checkpoint, reference, tmp_path / "out", config=TINY_TRANSFORMER)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.pt"]
    _raises("entry must be one of", "y.pt", export_reference_checkpoint, reference, tmp_path / "y.pt", entry="critic")
    _raises("not a diffusers Wan transformer", "z.pt", export_reference_checkpoint,
            to_original_names(reference), tmp_path / "z.pt")


class _Payload:
    pass


def test_bad_transformer_files_give_clear_errors(tmp_path, reference):
    original = to_original_names(reference)
    load = load_transformer_state_dict

    _raises("no such file", tmp_path / "missing.pt", load, tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    _raises("holds no weights file", tmp_path / "empty", load, tmp_path / "empty")
    (tmp_path / "two").mkdir()
    for name in ("a.pt", "b.pt"):
        torch.save({"generator": {}}, tmp_path / "two" / name)
    _raises("several weights files", tmp_path / "two", load, tmp_path / "two")
    (tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "transformer").mkdir(parents=True)
    (tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "model_index.json").write_text("{}")
    _raises("diffusers pipeline folder: pass its transformer/", "Wan2.1-T2V-1.3B-Diffusers", load,
            tmp_path / "Wan2.1-T2V-1.3B-Diffusers")

    torch.save({"generator_ema": {"model.patch_embedding.weight": torch.zeros(1)}, "extra": _Payload()},
               tmp_path / "code.pt")
    _raises(r"refusing to unpickle code.*_Payload", tmp_path / "code.pt", load, tmp_path / "code.pt")
    torch.save({"w": _Payload()}, tmp_path / "old_code.pt", _use_new_zipfile_serialization=False)
    _raises("refusing to unpickle code", tmp_path / "old_code.pt", load, tmp_path / "old_code.pt")
    (tmp_path / "garbage.pt").write_bytes(b"definitely not a checkpoint")
    _raises("refusing to unpickle code.*damaged", tmp_path / "garbage.pt", load, tmp_path / "garbage.pt")
    data = (tmp_path / "code.pt").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    _raises("not a readable torch checkpoint", tmp_path / "truncated.pth", load, tmp_path / "truncated.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    _raises("not a readable safetensors", tmp_path / "broken.safetensors", load, tmp_path / "broken.safetensors")
    (tmp_path / "weights.gguf").write_bytes(b"x")
    _raises("unknown file type", tmp_path / "weights.gguf", load, tmp_path / "weights.gguf")

    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    _raises("expected a dict of tensors, found list", tmp_path / "list.pt", load, tmp_path / "list.pt")
    torch.save({**{f"model.{k}": v for k, v in original.items()}, "step": 100}, tmp_path / "flat_meta.pt")
    _raises(r"non-tensor values: 'step' \(int\)", tmp_path / "flat_meta.pt", load, tmp_path / "flat_meta.pt")
    torch.save({"generator": {"model.patch_embedding.weight": [1, 2]}}, tmp_path / "nested.pt")
    _raises(r"entry 'generator' holds non-tensor", tmp_path / "nested.pt", load, tmp_path / "nested.pt")
    torch.save({"generator_ema": {}}, tmp_path / "empty_entry.pt")
    _raises("holds no tensors", tmp_path / "empty_entry.pt", load, tmp_path / "empty_entry.pt")

    stable_diffusion = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
                        "first_stage_model.encoder.conv_in.weight": torch.zeros(2)}
    save_file(stable_diffusion, tmp_path / "sd15.safetensors")
    _raises("not a Wan transformer", tmp_path / "sd15.safetensors", load, tmp_path / "sd15.safetensors")
    save_file({"foo": torch.zeros(1), "bar.baz": torch.zeros(1)}, tmp_path / "random.safetensors")
    _raises("not a Wan transformer", tmp_path / "random.safetensors", load, tmp_path / "random.safetensors")
    mixed = {**original, "blocks.0.attn1.to_q.weight": torch.zeros(1)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    _raises("mixes original Wan names", tmp_path / "mixed.safetensors", load, tmp_path / "mixed.safetensors")
    lora = {**original, "blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)}
    save_file(lora, tmp_path / "with_lora.safetensors")
    _raises(r"not part of a Wan2.1 transformer \(e.g. blocks.0.attn1.to_q.lora_A",
            tmp_path / "with_lora.safetensors", load, tmp_path / "with_lora.safetensors")
    collide = {**{f"model.{k}": v for k, v in original.items()}, "patch_embedding.weight": torch.zeros(1)}
    torch.save(collide, tmp_path / "collide.pt")
    _raises("collides", tmp_path / "collide.pt", load, tmp_path / "collide.pt")

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    save_file({"patch_embedding.weight": reference["patch_embedding.weight"]}, shard_dir / "a.safetensors")
    (shard_dir / "gone.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"patch_embedding.weight": "a.safetensors", "proj_out.weight": "b.safetensors"}}))
    _raises("shard 'b.safetensors' is missing", "gone.safetensors.index.json", load,
            shard_dir / "gone.safetensors.index.json")
    (shard_dir / "escape.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../a.safetensors"}}))
    _raises("leaves the index's folder", "escape.safetensors.index.json", load,
            shard_dir / "escape.safetensors.index.json")
    (shard_dir / "short.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"patch_embedding.weight": "a.safetensors", "proj_out.weight": "a.safetensors"}}))
    _raises("1 keys of the index are in no shard", "short.safetensors.index.json", load,
            shard_dir / "short.safetensors.index.json")
    (shard_dir / "bad.safetensors.index.json").write_text("{not json")
    _raises("not a sharded-checkpoint index", "bad.safetensors.index.json", load,
            shard_dir / "bad.safetensors.index.json")


def test_check_state_dict_matches_lists_every_kind_of_problem(reference):
    model = _wan()
    check_state_dict_matches(model, reference, "ok.pt")
    bad = {k: v for k, v in reference.items() if k != "proj_out.bias"}
    bad["blocks.0.ffn.net.2.weight"] = torch.zeros(3, 3)
    bad["blocks.9.attn1.to_q.weight"] = torch.zeros(1)
    error = _raises("missing keys", "broken.pt", check_state_dict_matches, model, bad, "dir/broken.pt")
    message = str(error)
    assert "1 missing keys (e.g. proj_out.bias)" in message
    assert "1 unexpected keys (e.g. blocks.9.attn1.to_q.weight)" in message
    assert "blocks.0.ffn.net.2.weight: file (3, 3) vs model (64, 128)" in message


# -- VAE ---------------------------------------------------------------------------------------------------------------
_VAE_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
               "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
               "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def _vae_to_original(sd: dict, num_res_blocks: int = 2) -> dict:
    """diffusers ``AutoencoderKLWan`` names -> the original Wan2.1 VAE names (as in ``wan_2.1_vae.safetensors``)."""
    per_up_block = num_res_blocks + 2  # resnets, then one upsampler
    out = {}
    for key, value in sd.items():
        rules = [
            (r"quant_conv\.(.+)", lambda m: f"conv1.{m[1]}"),
            (r"post_quant_conv\.(.+)", lambda m: f"conv2.{m[1]}"),
            (r"(encoder|decoder)\.conv_in\.(.+)", lambda m: f"{m[1]}.conv1.{m[2]}"),
            (r"(encoder|decoder)\.norm_out\.gamma", lambda m: f"{m[1]}.head.0.gamma"),
            (r"(encoder|decoder)\.conv_out\.(.+)", lambda m: f"{m[1]}.head.2.{m[2]}"),
            (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)",
             lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_VAE_RESNET[m[3]]}"),
            (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
            (r"encoder\.down_blocks\.(\d+)\.(.+)",
             lambda m: f"encoder.downsamples.{m[1]}.{_VAE_RESNET.get(m[2], m[2])}"),
            (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
             lambda m: f"decoder.upsamples.{per_up_block * int(m[1]) + int(m[2])}.{_VAE_RESNET[m[3]]}"),
            (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
             lambda m: f"decoder.upsamples.{per_up_block * int(m[1]) + per_up_block - 1}.{m[2]}"),
        ]
        for pattern, rename in rules:
            match = re.fullmatch(pattern, key)
            if match:
                out[rename(match)] = value
                break
        else:
            raise AssertionError(f"no original name for {key}")
    return out


@pytest.fixture(scope="module")
def wan21_family_vae():
    """The Wan2.1 VAE's architecture (dim_mult 1,2,4,4, two residual blocks) at base width 16 instead of 96."""
    torch.manual_seed(3)
    return AutoencoderKLWan(base_dim=16).eval()


def test_vae_original_layout_single_file(tmp_path, wan21_family_vae):
    sd = wan21_family_vae.state_dict()
    original = _vae_to_original(sd)
    assert "decoder.upsamples.4.shortcut.weight" in original and "decoder.middle.1.to_qkv.weight" in original
    save_file({k: v.to(torch.bfloat16) for k, v in original.items()}, tmp_path / "wan_2.1_vae.safetensors")
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")

    from_comfy = load_wan_vae_single_file(tmp_path / "wan_2.1_vae.safetensors", dtype=torch.bfloat16)
    _assert_same(from_comfy.state_dict(), {k: v.to(torch.bfloat16) for k, v in sd.items()})
    from_pth = load_wan_vae_single_file(tmp_path / "Wan2.1_VAE.pth")
    _assert_same(from_pth.state_dict(), sd)
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "latents_mean",
                "latents_std"):
        assert _plain(from_pth.config[key]) == _plain(wan21_family_vae.config[key]), key
    x = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pth.decode(x).sample, wan21_family_vae.decode(x).sample)


def test_vae_diffusers_keys_folder_and_errors(tmp_path, wan21_family_vae):
    small = make_tiny_vae()  # a different shape family: dim_mult 1,2,2,2 and one residual block
    save_file(small.state_dict(), tmp_path / "vae.safetensors")
    loaded = load_wan_vae_single_file(tmp_path / "vae.safetensors")
    _assert_same(loaded.state_dict(), small.state_dict())
    assert infer_wan_vae_config(small.state_dict())["num_res_blocks"] == 1
    assert list(loaded.config.dim_mult) == [1, 2, 2, 2]
    save_file({f"first_stage_model.{k}": v for k, v in small.state_dict().items()}, tmp_path / "prefixed.safetensors")
    _assert_same(load_wan_vae_single_file(tmp_path / "prefixed.safetensors").state_dict(), small.state_dict())
    small.save_pretrained(tmp_path / "vae")
    _assert_same(load_wan_vae_single_file(tmp_path / "vae").state_dict(), small.state_dict())

    save_file({"x": torch.zeros(3)}, tmp_path / "not_vae.safetensors")
    _raises("not a Wan VAE", tmp_path / "not_vae.safetensors", load_wan_vae_single_file,
            tmp_path / "not_vae.safetensors")
    broken = dict(small.state_dict())
    broken["decoder.conv_out.weight"] = broken["decoder.conv_out.weight"][:2].contiguous()
    del broken["encoder.norm_out.gamma"]
    save_file(broken, tmp_path / "bad_vae.safetensors")
    _raises(r"missing keys \(e.g. encoder.norm_out.gamma\).*mismatched shapes", tmp_path / "bad_vae.safetensors",
            load_wan_vae_single_file, tmp_path / "bad_vae.safetensors")
    wide = {**small.state_dict(), "post_quant_conv.weight": torch.zeros(48, 48, 1, 1, 1)}
    save_file(wide, tmp_path / "wan2.2_vae.safetensors")
    _raises("Wan2.2 VAE", tmp_path / "wan2.2_vae.safetensors", load_wan_vae_single_file,
            tmp_path / "wan2.2_vae.safetensors")
    _raises("no such file", tmp_path / "nope.safetensors", load_wan_vae_single_file, tmp_path / "nope.safetensors")


# -- UMT5 text encoder -------------------------------------------------------------------------------------------------
_WAN_T5_BLOCK = {"layer.0.layer_norm.weight": "norm1.weight", "layer.0.SelfAttention.q.weight": "attn.q.weight",
                 "layer.0.SelfAttention.k.weight": "attn.k.weight", "layer.0.SelfAttention.v.weight": "attn.v.weight",
                 "layer.0.SelfAttention.o.weight": "attn.o.weight",
                 "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
                 "layer.1.layer_norm.weight": "norm2.weight", "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
                 "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
                 "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight"}


def _umt5_to_wan(sd: dict) -> dict:
    """transformers UMT5 encoder names -> the original Wan ``T5Encoder`` names (``models_t5_umt5-xxl-enc-bf16.pth``)."""
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for key, value in sd.items():
        match = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
        if match:
            out[f"blocks.{match[1]}.{_WAN_T5_BLOCK[match[2]]}"] = value
    return out


@pytest.fixture(scope="module")
def encoder():
    return make_tiny_text_encoder(vocab_size=40)


def _hidden(model, ids=torch.tensor([[4, 5, 6, 7, 1, 0]]), mask=torch.tensor([[1, 1, 1, 1, 1, 0]])):
    with torch.no_grad():
        return model(ids, attention_mask=mask).last_hidden_state


def test_umt5_single_files_in_every_layout(tmp_path, encoder):
    sd = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    expected = _hidden(encoder)

    # ComfyUI-style: transformers names, no encoder.embed_tokens copy, an embedded sentencepiece model
    comfy = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    comfy["spiece_model"] = torch.frombuffer(bytearray(b"\x0a\x0bspm-bytes"), dtype=torch.uint8)
    save_file(comfy, tmp_path / "umt5_xxl_fp16.safetensors")
    loaded = load_umt5_encoder_single_file(tmp_path / "umt5_xxl_fp16.safetensors")
    assert isinstance(loaded, UMT5EncoderModel) and not loaded.training
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(loaded.config, key) == getattr(encoder.config, key), key
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight
    assert torch.equal(_hidden(loaded), expected)

    # encoder-only keys (embed_tokens instead of shared) under a merged checkpoint's component prefix
    only_encoder = {f"text_encoders.umt5xxl.transformer.{k}": v for k, v in sd.items() if k != "shared.weight"}
    only_encoder["model.diffusion_model.patch_embedding.weight"] = torch.zeros(2)
    save_file(only_encoder, tmp_path / "merged.safetensors")
    assert torch.equal(_hidden(load_umt5_encoder_single_file(tmp_path / "merged.safetensors")), expected)

    # the original Wan T5 checkpoint, read with weights_only
    torch.save(_umt5_to_wan(sd), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    assert torch.equal(_hidden(load_umt5_encoder_single_file(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")), expected)

    # a transformers folder
    encoder.save_pretrained(tmp_path / "text_encoder")
    assert torch.equal(_hidden(load_umt5_encoder_single_file(tmp_path / "text_encoder")), expected)


def test_umt5_scaled_fp8_and_dtypes(tmp_path, encoder):
    sd = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    quantized, dequantized = {}, dict(sd)
    for key, value in sd.items():
        if key.startswith("encoder.block.") and value.ndim == 2 and "relative_attention_bias" not in key:
            scale = value.abs().max() / 448.0
            quantized[key] = (value / scale).to(FP8)
            quantized[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            quantized[key[: -len("weight")] + "scale_input"] = torch.ones(())
            dequantized[key] = quantized[key].float() * scale
        else:
            quantized[key] = value
    quantized["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(quantized, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    kept = load_umt5_encoder_single_file(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    assert kept.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == FP8  # by default fp8 stays fp8
    loaded = load_umt5_encoder_single_file(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                           storage_dtype=torch.float32)
    reference = make_tiny_text_encoder(vocab_size=40)
    reference.load_state_dict(dequantized, strict=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in dequantized.items())
    assert torch.equal(_hidden(loaded), _hidden(reference))
    assert torch.allclose(_hidden(loaded), _hidden(encoder), atol=0.2)

    half = load_umt5_encoder_single_file(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.float16,
                                         storage_dtype=torch.float16)
    assert half.shared.weight.dtype == torch.float16
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # as transformers does
    assert torch.isfinite(_hidden(half)).all()
    bf16 = load_umt5_encoder_single_file(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.bfloat16,
                                         storage_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_umt5_bad_files(tmp_path, encoder):
    sd = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file({"x": torch.zeros(1)}, tmp_path / "nope.safetensors")
    _raises("not a UMT5 encoder", tmp_path / "nope.safetensors", load_umt5_encoder_single_file,
            tmp_path / "nope.safetensors")
    t5_like = {k: v for k, v in sd.items() if not k.startswith("encoder.block.1.layer.0.SelfAttention.relative")}
    save_file(t5_like, tmp_path / "t5xxl.safetensors")
    _raises("T5", tmp_path / "t5xxl.safetensors", load_umt5_encoder_single_file, tmp_path / "t5xxl.safetensors")
    damaged = {k: v for k, v in sd.items() if k != "encoder.final_layer_norm.weight"}
    damaged["encoder.block.0.layer.0.SelfAttention.o.weight"] = torch.zeros(32, 31)
    save_file(damaged, tmp_path / "damaged.safetensors")
    _raises(r"missing keys \(e.g. encoder.final_layer_norm.weight\).*mismatched shapes",
            tmp_path / "damaged.safetensors", load_umt5_encoder_single_file, tmp_path / "damaged.safetensors")
    torch.save({"generator": {"w": torch.zeros(1)}, "x": _Payload()}, tmp_path / "umt5_code.pth")
    _raises("refusing to unpickle code", tmp_path / "umt5_code.pth", load_umt5_encoder_single_file,
            tmp_path / "umt5_code.pth")


def test_every_written_layout_makes_the_same_video(tmp_path, capsys):
    """Train -> export -> load, the path the README describes, with the shipped model (4 heads x 64, which shapes
    cannot tell from 2 x 128): every layout the project writes loads back to the same video."""
    import cv2

    from oneforcing import DEMO_MODEL_DIR, OneForcingPipeline
    from oneforcing.__main__ import main as cli
    from oneforcing.training.__main__ import main as training

    demo = OneForcingPipeline.from_pretrained(DEMO_MODEL_DIR)

    def video(transformer=None):
        pipe = demo if transformer is None else OneForcingPipeline.from_pretrained(DEMO_MODEL_DIR,
                                                                                   transformer=transformer)
        return pipe("a yellow circle moves right on a black background", num_frames=9, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames

    expected = video()
    exported_path = tmp_path / "x" / "one_forcing.pt"
    training(["export", "--source", str(DEMO_MODEL_DIR / "transformer"), "--out", str(exported_path)])
    demo.save_pretrained(tmp_path / "saved")
    layouts = {
        "export .pt": exported_path,
        "save_pretrained transformer/ folder": tmp_path / "saved" / "transformer",
        "its weights file": tmp_path / "saved" / "transformer" / "diffusion_pytorch_model.safetensors",
    }
    for layout, path in layouts.items():
        loaded = CausalWanTransformer3DModel.from_single_file(path)
        assert (loaded.config.num_attention_heads, loaded.config.attention_head_dim) == (4, 64), layout
        # the same weights and config; CPU matrix products may differ in the last bits with the weights' alignment
        torch.testing.assert_close(video(loaded), expected, rtol=0, atol=1e-4, msg=layout)
    torch.testing.assert_close(video(OneForcingPipeline.from_pretrained(tmp_path / "saved").transformer), expected,
                               rtol=0, atol=1e-4)

    # the commands: the exported file through the CLI makes the same mp4 frames as the demo itself
    def frames(out, *extra):
        assert cli(["generate", "--prompt", "a yellow circle moves right on a black background", "--out", str(out),
                    "--num-frames", "9", *extra]) == 0
        capture, read = cv2.VideoCapture(str(out)), []
        while (item := capture.read())[0]:
            read.append(item[1])
        return np.stack(read)

    exported = frames(tmp_path / "b.mp4", "--transformer", str(layouts["export .pt"]))
    assert np.array_equal(frames(tmp_path / "a.mp4"), exported)


def test_load_transformer_picks_the_loader_of_a_folder_or_a_file(tmp_path, reference):
    """The one owner of the file-vs-folder choice (the CLI's --transformer, the loader node, evaluate.py): a diffusers
    folder through from_pretrained, every other layout through from_single_file; failures name the path."""
    for layout, path in _write_transformer_layouts(tmp_path, reference).items():
        model = load_transformer(path, num_attention_heads=2)
        assert isinstance(model, CausalWanTransformer3DModel)
        _assert_same(model.state_dict(), reference, layout)
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file or folder"):
        load_transformer(tmp_path / "nope.pt")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "CausalWanTransformer3DModel", "num_layers": 1}))
    with pytest.raises(CheckpointError, match=r"broken: cannot load the transformer: .*no file named"):
        load_transformer(broken)  # diffusers' own error, with the path
