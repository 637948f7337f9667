"""The ComfyUI nodes' plain layer (no ComfyUI needed): declarations, model folders, loaders, rollout, decoder.

Tiny real models are saved into a folder laid out like ComfyUI's ``models/`` (and a bundled-demo pipeline folder);
``build_model_tree`` is reused by test_workflows.py and test_comfyui_server.py.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import WORDS, make_tiny_pipeline, make_tiny_text_encoder, make_tiny_transformer, make_tiny_vae

import oneforcing
from oneforcing.nodes import NODE_SPECS, BUNDLED_DEMO, list_models, object_info, set_model_roots, validate_spec
from oneforcing.nodes import definitions, folders
from oneforcing.nodes.latents import to_normalised, to_raw
from oneforcing.nodes.sampling import generate_latents
from oneforcing.nodes.spec import InputSpec, NodeSpec, OutputSpec
from oneforcing.pipelines.vae_streaming import WanStreamingDecoder
from oneforcing.pipelines.loading import CheckpointError, export_reference_checkpoint, to_original_names

DEMO = BUNDLED_DEMO
HEAD128 = dict(num_attention_heads=1, attention_head_dim=128, ffn_dim=128)  # single files assume head size 128


# -- tiny model tree -----------------------------------------------------------------------------------------------
def train_tiny_spiece() -> bytes:
    """A tiny SentencePiece unigram model (what ComfyUI's umt5 files embed as ``spiece_model``)."""
    import sentencepiece

    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 8
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=48, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    return buffer.getvalue()


def comfy_umt5_file(path: Path, d_model: int, seed: int = 0) -> Path:
    """A ComfyUI-style single-file UMT5 encoder: transformers names plus an embedded ``spiece_model``."""
    spiece = train_tiny_spiece()
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    encoder = make_tiny_text_encoder(vocab, d_model=d_model, seed=seed)
    tensors = {k: v.clone().contiguous() for k, v in encoder.state_dict().items()}
    tensors["spiece_model"] = torch.tensor(list(spiece), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def comfy_transformer_file(path: Path, text_dim: int = 32, seed: int = 0) -> Path:
    """A ComfyUI single-file transformer: original Wan names under ``model.diffusion_model.``."""
    model = make_tiny_transformer(seed, **HEAD128, text_dim=text_dim)
    original = to_original_names(model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}, str(path))
    return path


def build_model_tree(root: Path) -> dict:
    """``root/models/{diffusion_models,text_encoders,vae}`` with tiny files, and ``root/oneforcing-demo`` (a saved
    chunk-wise tiny pipeline). Returns the paths and the models used."""
    models = root / "models"
    demo = make_tiny_pipeline(seed=0, frames_per_block=3)
    demo.save_pretrained(root / "oneforcing-demo")
    pt_model = make_tiny_transformer(1, **HEAD128)
    export_reference_checkpoint(pt_model, models / "diffusion_models" / "tiny_oneforcing.pt")
    comfy_transformer_file(models / "unet" / "sub" / "tiny_comfy.safetensors")
    make_tiny_transformer(2, frames_per_block=3).save_pretrained(models / "diffusion_models" / "tiny_diffusers")
    comfy_umt5_file(models / "text_encoders" / "tiny_umt5.safetensors", d_model=32)
    enc = make_tiny_text_encoder(40, d_model=32)  # transformers names, no tokenizer anywhere
    save_file({k: v.clone().contiguous() for k, v in enc.state_dict().items()},
              str(models / "text_encoders" / "no_tokenizer.safetensors"))
    vae = make_tiny_vae(3)
    (models / "vae").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(models / "vae" / "tiny_vae.safetensors"))
    return {"root": root, "models": models, "demo_dir": root / "oneforcing-demo", "demo": demo, "vae": vae,
            "pt_model": pt_model}


@pytest.fixture(scope="session")
def model_tree(tmp_path_factory):
    return build_model_tree(tmp_path_factory.mktemp("comfy"))


@pytest.fixture
def roots(model_tree, monkeypatch):
    models = model_tree["models"]
    monkeypatch.setenv("ONEFORCING_DEMO_DIR", str(model_tree["demo_dir"]))
    set_model_roots({
        "diffusion_models": [models / "diffusion_models", models / "unet"],
        "text_encoders": [models / "text_encoders", models / "clip"],
        "vae": [models / "vae"],
    })
    yield model_tree
    set_model_roots(None)


# -- declarations --------------------------------------------------------------------------------------------------
def test_every_declaration_is_valid_and_distinct_from_comfyui_native_nodes():
    ids = [spec.node_id for spec in NODE_SPECS]
    assert ids == ["OneForcingModelLoader", "OneForcingTextEncode", "OneForcingRollout", "OneForcingDecode"]
    for spec in NODE_SPECS:
        validate_spec(spec)
    names = {spec.display_name for spec in NODE_SPECS}
    assert len(names) == 4 and not names & {"LoadARVideoModel", "EmptyARVideoLatent", "Load AR Video Model"}
    info = object_info(definitions.ROLLOUT)
    assert info["input_order"] == {
        "required": ["model", "conditioning", "seed", "width", "height", "length", "frames_per_block", "timesteps"],
        "optional": ["initial_latent"],
    }
    assert info["output"] == ["LATENT"]
    assert info["input"]["required"]["seed"][1]["control_after_generate"] is True


def _spec(**overrides):
    def run(x: int, name: str):
        return (x,)

    fields = dict(
        node_id="OneForcingProbe", display_name="One-Forcing Probe", category="OneForcing/test", description="d",
        inputs=(InputSpec("x", "INT", "t", default=1, min=0, max=4), InputSpec("name", "COMBO", "t", default="a",
                                                                              options=("a", "b"))),
        outputs=(OutputSpec("LATENT", "latent"),), function=run,
    )
    return NodeSpec(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, problem", [
    ({}, None),
    ({"node_id": "LoadARVideoModel"}, "must be an identifier starting with"),
    ({"inputs": (InputSpec("x", "INT", "t", default=9, min=0, max=4), InputSpec("name", "STRING", "t", default=""))},
     "default 9 outside"),
    ({"inputs": (InputSpec("x", "INT", "t", default=1, min=0, max=4),
                 InputSpec("name", "COMBO", "t", default="z", options=("a",)))}, "is not one of"),
    ({"inputs": (InputSpec("x", "INT", "t", default=1, min=0, max=4),)}, "differ from the parameters"),
    ({"inputs": (InputSpec("x", "INT", "", default=1, min=0, max=4), InputSpec("name", "STRING", "t", default=""))},
     "needs a tooltip"),
    ({"outputs": (OutputSpec("WHATEVER", "w"),)}, "unknown type"),
])
def test_validate_spec_reports_problems(overrides, problem):
    if problem is None:
        validate_spec(_spec(**overrides))
    else:
        with pytest.raises(ValueError, match=problem):
            validate_spec(_spec(**overrides))


def test_package_imports_without_comfyui_and_exposes_only_the_v3_entry_point():
    assert "comfy_api" not in sys.modules and "comfy" not in sys.modules
    assert callable(oneforcing.comfy_entrypoint)
    assert not hasattr(oneforcing, "NODE_CLASS_MAPPINGS")  # it would make ComfyUI ignore comfy_entrypoint


# -- model folders -------------------------------------------------------------------------------------------------
def test_model_lists_offer_the_bundled_demo_files_and_folders(roots):
    assert list_models("diffusion_models") == [DEMO, "sub/tiny_comfy.safetensors", "tiny_diffusers/",
                                               "tiny_oneforcing.pt"]
    assert list_models("text_encoders") == [DEMO, "no_tokenizer.safetensors", "tiny_umt5.safetensors"]
    assert list_models("vae") == [DEMO, "tiny_vae.safetensors"]
    assert folders.resolve_model("vae", DEMO) == roots["demo_dir"]


@pytest.mark.parametrize("name, error, message", [
    ("missing.safetensors", FileNotFoundError, "not found in"),
    ("../../x", ValueError, r"'\.\.' is not allowed"),
    ("sub/../../../etc/passwd", ValueError, r"'\.\.' is not allowed"),
    ("/etc/passwd", ValueError, "absolute path"),
    ("C:\\models\\x.pt", ValueError, "backslashes"),
    ("", ValueError, "non-empty"),
])
def test_bad_model_names_give_clear_errors(roots, name, error, message):
    with pytest.raises(error, match=message):
        definitions.model_loader(name, "default", "model default", "auto")


def test_missing_bundled_demo_says_where_it_should_be(roots, monkeypatch, tmp_path):
    monkeypatch.setenv("ONEFORCING_DEMO_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="bundled demo model is not installed at .*nowhere"):
        definitions.decode({"samples": torch.zeros(1, 16, 1, 2, 2)}, DEMO)


# -- loaders -------------------------------------------------------------------------------------------------------
def test_loader_reads_every_layout_and_the_frames_per_block_default(roots):
    demo_model, = definitions.model_loader(DEMO, "default", "model default", "auto")
    assert demo_model.frames_per_block == 3  # from the bundled model's config
    assert demo_model.latents_mean == list(roots["demo"].vae.config.latents_mean)
    pt_model, = definitions.model_loader("tiny_oneforcing.pt", "float32", "1 (frame-wise)", "math")
    for name, param in roots["pt_model"].state_dict().items():
        torch.testing.assert_close(pt_model.transformer.state_dict()[name], param)
    assert pt_model.frames_per_block == 1 and pt_model.transformer.attention_backend == "math"
    comfy_model, = definitions.model_loader("sub/tiny_comfy.safetensors", "bfloat16", "3 (chunk-wise)", "auto")
    assert comfy_model.frames_per_block == 3 and comfy_model.transformer.proj_out.weight.dtype == torch.bfloat16
    folder_model, = definitions.model_loader("tiny_diffusers/", "default", "model default", "auto")
    assert folder_model.frames_per_block == 3
    assert type(folder_model.patcher.model).__name__ == "ModelHolder"  # what ComfyUI's ModelPatcher manages


def test_text_encoder_from_comfy_single_file_and_bundled_demo(roots):
    (cond,) = definitions.text_encode("tiny_umt5.safetensors", "a corgi surfing", "default")
    embeds, extra = cond[0]
    assert embeds.shape == (1, 512, 32) and extra == {}
    tokens = (embeds.abs().sum(-1) > 0).sum().item()
    assert 2 <= tokens < 20  # pieces + </s>, zero after them
    (demo_cond,) = definitions.text_encode(DEMO, "a corgi surfing", "default")
    expected = roots["demo"].encode_prompt("a corgi surfing", device="cpu", dtype=torch.float32)
    torch.testing.assert_close(demo_cond[0][0], expected)
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        definitions.text_encode("no_tokenizer.safetensors", "a cat", "default")


# -- rollout -------------------------------------------------------------------------------------------------------
def test_rollout_equals_the_pipeline_and_its_latent_is_raw_vae_space(roots):
    model, = definitions.model_loader(DEMO, "default", "model default", "auto")
    cond, = definitions.text_encode(DEMO, "a red circle moves left", "default")
    calls = []
    latent = generate_latents(model, cond, 7, 16, 32, 13, 0, "first block four steps",
                              on_progress=lambda done, total: calls.append((done, total)))
    samples = latent["samples"]
    assert samples.shape == (1, 16, 4, 4, 2) and samples.dtype == torch.float32
    assert calls == [(1, 2), (2, 2)]  # 4 latent frames in chunk-wise blocks of 3 and 1
    pipe = roots["demo"]
    expected = pipe(prompt_embeds=cond[0][0], num_frames=13, height=32, width=16, denoising_timesteps=[1000],
                    first_block_timesteps=[1000, 750, 500, 250], generator=torch.Generator().manual_seed(7),
                    output_type="latent").frames
    normalised = to_normalised(samples, model.latents_mean, model.latents_std)
    torch.testing.assert_close(normalised, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(to_raw(normalised, model.latents_mean, model.latents_std), samples)
    assert not torch.allclose(samples, normalised)  # the LATENT really is in raw space
    # decoding the raw LATENT gives the pipeline's video of the same latents
    images, = definitions.decode(latent, DEMO)
    video = WanStreamingDecoder(pipe.vae).decode_all(expected)  # the pipeline's decode of its latents
    video = ((video + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)
    assert images.shape == (13, 32, 16, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    torch.testing.assert_close(images, video, atol=2e-4, rtol=0)


def test_rollout_accepts_native_conditioning_and_initial_latent_shape(roots):
    model, = definitions.model_loader(DEMO, "default", "1 (frame-wise)", "auto")
    native = [[torch.randn(1, 512, 32), {"pooled_output": None}]]
    empty = {"samples": torch.zeros(2, 16, 3, 2, 4)}
    latent, = definitions.rollout(model, native, 1, 832, 480, 81, 0, "one step", empty)
    assert latent["samples"].shape == (2, 16, 3, 2, 4)
    with pytest.raises(ValueError, match="width 4096, the model's text encoder width is 32"):
        definitions.rollout(model, [[torch.zeros(1, 512, 4096), {}]], 1, 32, 32, 5, 0, "one step")
    with pytest.raises(ValueError, match="2 entries"):
        definitions.rollout(model, native * 2, 1, 32, 32, 5, 0, "one step")


@pytest.mark.parametrize("width, height, length, message", [
    (40, 32, 5, "width must be a positive multiple of 16, got 40"),
    (32, 24, 5, "height must be a positive multiple of 16, got 24"),
    (32, 32, 0, "length must be at least 1 video frame, got 0"),
    (32, 32, 6, r"length must be 1 \+ 4k video frames"),
])
def test_rollout_rejects_bad_sizes(roots, width, height, length, message):
    model, = definitions.model_loader(DEMO, "default", "model default", "auto")
    cond = [[torch.zeros(1, 512, 32), {}]]
    with pytest.raises(ValueError, match=message):
        definitions.rollout(model, cond, 0, width, height, length, 0, "one step")


def test_cancel_stops_between_blocks(roots):
    model, = definitions.model_loader(DEMO, "default", "1 (frame-wise)", "auto")
    cond = [[torch.zeros(1, 512, 32), {}]]
    done = []
    with pytest.raises(InterruptedError):
        generate_latents(model, cond, 0, 32, 32, 17, 0, "one step",
                         on_progress=lambda d, t: done.append(d), should_stop=lambda: len(done) >= 2)
    assert done == [1, 2]  # 5 blocks planned; stopped before the third


# -- decoder -------------------------------------------------------------------------------------------------------
def test_decoder_from_vae_folder_matches_a_full_decode(roots):
    vae = roots["vae"]
    raw = torch.randn(1, 16, 2, 2, 4)
    images, = definitions.decode({"samples": raw}, "tiny_vae.safetensors")
    assert images.shape == (5, 16, 32, 3)
    with torch.no_grad():
        full = vae.decode(raw).sample  # diffusers' decode takes raw latents
    expected = ((full.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="4 channels; Wan2.1 video latents have 16"):
        definitions.decode({"samples": torch.zeros(1, 4, 3, 4, 4)}, "tiny_vae.safetensors")
    with pytest.raises(TypeError, match="ComfyUI's VAE object"):
        definitions.decode({"samples": raw}, "tiny_vae.safetensors", vae=object())


def test_rollout_runs_under_inference_mode_like_comfyui(roots):
    """ComfyUI executes every node under ``torch.inference_mode()``; the conditioning is then an inference tensor."""
    model, = definitions.model_loader(DEMO, "default", "model default", "auto")
    with torch.inference_mode():
        cond, = definitions.text_encode(DEMO, "a red circle moves left", "default")
        latent, = definitions.rollout(model, cond, 3, 16, 16, 5, 0, "one step")
    plain, = definitions.rollout(model, [[cond[0][0].clone(), {}]], 3, 16, 16, 5, 0, "one step")
    torch.testing.assert_close(latent["samples"], plain["samples"])


def test_conditioning_is_fitted_to_the_length_the_model_was_trained_with():
    """512-token conditioning cut to 16 tokens equals encoding at 16 (the demo model records 32); shorter ones are
    zero-padded, as the pipeline pads."""
    from oneforcing.nodes.sampling import fit_text_length

    pipe = make_tiny_pipeline(seed=0)
    prompt = " ".join(WORDS[:3])
    with torch.no_grad():
        long = pipe.encode_prompt(prompt, max_sequence_length=512)
        short = pipe.encode_prompt(prompt, max_sequence_length=16)
    torch.testing.assert_close(fit_text_length(long, 16), short, rtol=1e-5, atol=1e-6)
    padded = fit_text_length(short[:, :5], 16)
    assert padded.shape == short.shape and padded[:, 5:].abs().max() == 0
