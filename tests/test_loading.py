"""Checkpoint layouts: every supported layout loads to identical weights; bad files give clear errors."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRANSFORMER, make_tiny_transformer, make_tiny_vae
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from oneforcing import CausalWanTransformer3DModel
from oneforcing.pipelines.loading import (
    CheckpointError,
    export_reference_checkpoint,
    infer_transformer_config,
    load_transformer_state_dict,
    load_umt5_encoder_single_file,
    load_wan_vae_single_file,
    to_original_names,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def reference():
    model = make_tiny_transformer(seed=7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write_layouts(folder: Path, sd: dict) -> dict[str, Path]:
    original = to_original_names(sd)
    paths = {}
    paths["one_forcing_pt"] = export_reference_checkpoint(sd, folder / "one_forcing.pt")
    torch.save({"generator": {f"model.{k}": v for k, v in original.items()},
                "critic": {"x": torch.zeros(1)}}, folder / "self_forcing_generator.pt")
    paths["generator_pt"] = folder / "self_forcing_generator.pt"
    torch.save({"model": {f"model._fsdp_wrapped_module.{k}": v for k, v in original.items()}}, folder / "fsdp.pt")
    paths["fsdp_pt"] = folder / "fsdp.pt"
    save_file(original, folder / "wan_original.safetensors")
    paths["original_safetensors"] = folder / "wan_original.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, folder / "comfy.safetensors")
    paths["comfyui_safetensors"] = folder / "comfy.safetensors"
    save_file(sd, folder / "diffusers.safetensors")
    paths["diffusers_safetensors"] = folder / "diffusers.safetensors"
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    paths["sharded_index"] = folder / "model.safetensors.index.json"
    return paths


def test_every_layout_loads_identical_weights(tmp_path, reference):
    for layout, path in _write_layouts(tmp_path, reference).items():
        loaded = load_transformer_state_dict(path)
        assert set(loaded) == set(reference), layout
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), layout
        model = CausalWanTransformer3DModel.from_single_file(path, num_attention_heads=2)
        assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference), layout


def test_ema_is_preferred_unless_asked(tmp_path, reference):
    other = {k: v + 1 for k, v in reference.items()}
    torch.save({"generator": {f"model.{k}": v for k, v in to_original_names(other).items()},
                "generator_ema": {f"model.{k}": v for k, v in to_original_names(reference).items()}},
               tmp_path / "both.pt")
    assert torch.equal(load_transformer_state_dict(tmp_path / "both.pt")["proj_out.weight"], reference["proj_out.weight"])
    raw = load_transformer_state_dict(tmp_path / "both.pt", prefer_ema=False)
    assert torch.equal(raw["proj_out.weight"], other["proj_out.weight"])


def test_inferred_config_rebuilds_the_model(reference):
    config = infer_transformer_config(reference, num_attention_heads=2)
    assert {k: config[k] for k in TINY_TRANSFORMER} == {**TINY_TRANSFORMER, "patch_size": (1, 2, 2)}
    model = WanTransformer3DModel(**config)
    model.load_state_dict(reference, strict=True)
    wide = {"patch_embedding.weight": torch.zeros(1536, 16, 1, 2, 2), **{k: v for k, v in reference.items()
                                                                      if k != "patch_embedding.weight"}}
    assert infer_transformer_config(wide)["num_attention_heads"] == 12  # head size 128 assumed
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        infer_transformer_config(reference)  # width 64: heads cannot be guessed


def test_reference_fixture_loads_every_key():
    sd = load_transformer_state_dict(FIXTURES / "ref_tiny_oneforcing.pt")
    model = WanTransformer3DModel(**infer_transformer_config(sd, num_attention_heads=2))
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_export_round_trip(tmp_path, reference):
    export_reference_checkpoint(reference, tmp_path / "x.pt", entry="generator")
    raw = torch.load(tmp_path / "x.pt", weights_only=True)
    assert list(raw) == ["generator"]
    assert "model.blocks.0.self_attn.q.weight" in raw["generator"] and "model.head.modulation" in raw["generator"]
    assert "model.blocks.0.norm3.weight" in raw["generator"]  # the affine cross-attention norm, original name
    again = load_transformer_state_dict(tmp_path / "x.pt")
    assert all(torch.equal(again[k], reference[k]) for k in reference)


class _Payload:
    pass


def test_bad_files_give_clear_errors(tmp_path, reference):
    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer_state_dict(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_transformer_state_dict(tmp_path)
    torch.save({"generator_ema": {"w": torch.zeros(1)}, "extra": _Payload()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_transformer_state_dict(tmp_path / "code.pt")
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(2)}, tmp_path / "sd15.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan transformer"):
        load_transformer_state_dict(tmp_path / "sd15.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_transformer_state_dict(tmp_path / "broken.safetensors")
    (tmp_path / "weights.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown file type"):
        load_transformer_state_dict(tmp_path / "weights.gguf")
    bigger = make_tiny_transformer(ffn_dim=96).state_dict()
    save_file(bigger, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="mismatched shapes"):
        CausalWanTransformer3DModel.from_single_file(
            tmp_path / "other.safetensors", config={**TINY_TRANSFORMER}
        )


def test_vae_single_file_diffusers_keys_and_errors(tmp_path):
    vae = make_tiny_vae()
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    loaded = load_wan_vae_single_file(tmp_path / "vae.safetensors", base_dim=16, dim_mult=[1, 2, 2, 2],
                                      num_res_blocks=1)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())
    save_file({"decoder.conv_in.weight": torch.zeros(3)}, tmp_path / "bad_vae.safetensors")
    with pytest.raises(CheckpointError, match="bad_vae"):
        load_wan_vae_single_file(tmp_path / "bad_vae.safetensors")
    save_file({"x": torch.zeros(3)}, tmp_path / "not_vae.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan VAE"):
        load_wan_vae_single_file(tmp_path / "not_vae.safetensors")


def test_umt5_single_file_and_folder(tmp_path):
    from conftest import make_tiny_text_encoder

    encoder = make_tiny_text_encoder(vocab_size=40)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"},
              tmp_path / "umt5.safetensors")
    loaded = load_umt5_encoder_single_file(tmp_path / "umt5.safetensors")
    ids = torch.tensor([[4, 5, 6, 1]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).last_hidden_state, encoder(ids).last_hidden_state, atol=1e-6)
    encoder.save_pretrained(tmp_path / "folder")
    assert load_umt5_encoder_single_file(tmp_path / "folder").config.d_model == 32
    save_file({"x": torch.zeros(1)}, tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a UMT5"):
        load_umt5_encoder_single_file(tmp_path / "nope.safetensors")
