"""The ComfyUI nodes' plain layer (no ComfyUI needed): declarations, model folders, loaders, rollout, decoder.

Tiny real models are saved into a folder laid out like ComfyUI's ``models/`` (and a bundled-demo pipeline folder);
``build_model_tree`` is reused by test_workflows.py and test_comfyui_server.py.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import WORDS, make_tiny_pipeline, make_tiny_text_encoder, make_tiny_transformer, make_tiny_vae

import oneforcing
from comfyui_node_info import node_info, recorded
from oneforcing.nodes.definitions import NODES
from oneforcing.nodes.definitions import OneForcingDecode as Decode
from oneforcing.nodes.definitions import OneForcingEncode as Encode
from oneforcing.nodes.definitions import OneForcingModelLoader as Loader
from oneforcing.nodes.definitions import OneForcingPromptSchedule as Schedule
from oneforcing.nodes.definitions import OneForcingRollout as Rollout
from oneforcing.nodes.definitions import OneForcingTextEncode as TextEncode
from oneforcing.nodes.folders import BUNDLED_DEMO, NO_TINY_VAE, list_models, set_model_roots
from oneforcing.nodes import definitions, folders, runtime
from oneforcing.nodes.latents import to_normalised, to_raw
from oneforcing.nodes.model_loading import load_tiny_vae, wan21_latent_stats
from oneforcing.nodes.sampling import BLOCK_NOISE, RolloutRequest, generate_latents
from oneforcing.pipelines.tiny_vae import TinyWanStreamingDecoder, TinyWanVAE
from oneforcing.pipelines.vae_streaming import WanStreamingDecoder, normalize_latents
from oneforcing.pipelines.fp8 import is_fp8_stored
from oneforcing.pipelines.loading import CheckpointError, export_reference_checkpoint, to_original_names
from oneforcing.pipelines.lora import WAN_LORA_TARGETS, wan_lora_file_tensors

DEMO = BUNDLED_DEMO
REPO = Path(__file__).resolve().parent.parent
HEAD128 = dict(num_attention_heads=1, attention_head_dim=128, ffn_dim=128)


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


def lora_file(transformer, path: Path, seed: int = 0, rank: int = 4, scale: float = 0.2) -> Path:
    """A Wan LoRA file for ``transformer`` as ``export`` writes one (original Wan layout, ``wan_lora_file_tensors``):
    random lora_A [r, in] and lora_B [out, r] for every layer Wan LoRAs adapt."""
    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(WAN_LORA_TARGETS):
            adapter[f"{name}.lora_A.default.weight"] = torch.randn(rank, layer.in_features, generator=g) * scale
            adapter[f"{name}.lora_B.default.weight"] = torch.randn(layer.out_features, rank, generator=g) * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(wan_lora_file_tensors(adapter), str(path))
    return path


def build_model_tree(root: Path) -> dict:
    """``root/models/{diffusion_models,text_encoders,vae,loras}`` with tiny files, and ``root/oneforcing-demo`` (a
    saved chunk-wise tiny pipeline). Returns the paths and the models used."""
    models = root / "models"
    demo = make_tiny_pipeline(seed=0, frames_per_block=3)
    demo.register_to_config(default_video_size={"num_frames": 9, "height": 16, "width": 32})  # what 0 stands for
    demo.save_pretrained(root / "oneforcing-demo")
    lora_file(demo.transformer, models / "loras" / "tiny_style.safetensors", seed=1)  # LoRAs for the demo
    lora_file(demo.transformer, models / "loras" / "sub" / "tiny_subject.safetensors", seed=2)
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
        "loras": [models / "loras"],
    })
    yield model_tree
    set_model_roots(None)


# -- declarations ---------------------------------------------------------------------------------------------------
NODE_INFO = recorded()  # the nodes' /object_info entries as ComfyUI renders them (see comfyui_node_info.py)
COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")


def test_every_node_is_declared_and_distinct_from_comfyui_native_nodes():
    ids = [node.__name__ for node in NODES]
    assert ids == ["OneForcingModelLoader", "OneForcingLora", "OneForcingTextEncode", "OneForcingPromptSchedule",
                   "OneForcingRollout", "OneForcingEncode", "OneForcingDecode"]
    assert list(NODE_INFO) == ids  # the record holds these nodes, named after their classes
    names = {info["display_name"] for info in NODE_INFO.values()}
    assert len(names) == len(ids) and all("One-Forcing" in n for n in names)
    assert not names & {"LoadARVideoModel", "EmptyARVideoLatent", "Load AR Video Model"}
    assert all(info["category"].startswith("OneForcing/") for info in NODE_INFO.values())
    info = NODE_INFO["OneForcingRollout"]
    # new inputs are optional and come last: workflows saved before them still load and validate
    assert info["input_order"] == {
        "required": ["model", "conditioning", "seed", "width", "height", "length", "frames_per_block", "timesteps"],
        "optional": ["initial_latent", "context_latent", "window_frames", "sink_frames", "keep_sink_on_switch",
                     "noise"],
    }
    assert info["input"]["optional"]["noise"][1]["default"] == "whole video"  # saved workflows keep their video
    assert info["output"] == ["LATENT"]
    assert info["input"]["required"]["seed"][1]["control_after_generate"] is True
    # one widget per parameter: the block size is the rollout's, not also the loader's
    assert "frames_per_block" not in NODE_INFO["OneForcingModelLoader"]["input_order"]["required"]


NO_DEFAULT = {"lora_name"}  # a list of the user's files only, as ComfyUI's LoRA loaders: the first file is chosen


@pytest.mark.parametrize("node", NODES, ids=lambda node: node.__name__)
def test_each_node_runs_with_the_inputs_it_declares(node):
    """ComfyUI calls ``execute`` with the inputs by name and leaves out optional ones a prompt does not give:
    ``execute`` takes exactly the declared inputs, the optional ones with the declared default; every input has a
    tooltip and every number its range; the queue-time check takes widget inputs only."""
    info = NODE_INFO[node.__name__]
    params = dict(inspect.signature(node.execute).parameters)
    assert list(params) == info["input_order"]["required"] + info["input_order"].get("optional", [])
    for section, entries in info["input"].items():
        for name, (kind, options) in entries.items():
            assert options.get("tooltip"), (name, "needs a tooltip")
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], name
            if kind == "COMBO" and name not in NO_DEFAULT:
                assert options["default"] in options["options"], name
            if section == "optional":
                assert params[name].default == options.get("default"), name
            else:
                assert params[name].default is inspect.Parameter.empty, name
    widgets = {n for entries in info["input"].values() for n, (kind, _) in entries.items()
               if kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")}
    if "validate_inputs" in vars(node):
        assert set(inspect.signature(node.validate_inputs).parameters) <= widgets


@pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout to run")
def test_the_record_is_what_comfyui_renders_of_the_classes():
    """ComfyUI's own V3 machinery (``GET_NODE_INFO_V1``) renders the classes as recorded; after changing a node,
    record it again with ``python tests/comfyui_node_info.py`` (see there)."""
    assert node_info(COMFYUI_ROOT, os.environ.get("COMFYUI_PYTHON")) == NODE_INFO


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
        Loader.execute(name, "default", "auto")


def test_missing_bundled_demo_says_where_it_should_be(roots, monkeypatch, tmp_path):
    monkeypatch.setenv("ONEFORCING_DEMO_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="bundled demo model is not installed at .*nowhere"):
        Decode.execute({"samples": torch.zeros(1, 16, 1, 2, 2)}, DEMO)


# -- loaders -------------------------------------------------------------------------------------------------------
def test_loader_reads_every_layout_and_the_frames_per_block_default(roots):
    demo_model, = Loader.execute(DEMO, "default", "auto")
    assert demo_model.frames_per_block == demo_model.trained_frames_per_block == 3  # the bundled model's config
    assert demo_model.latents_mean == list(roots["demo"].vae.config.latents_mean)
    pt_model, = Loader.execute("tiny_oneforcing.pt", "float32", "math")
    for name, param in roots["pt_model"].state_dict().items():
        torch.testing.assert_close(pt_model.transformer.state_dict()[name], param)
    assert pt_model.frames_per_block == 1 and pt_model.transformer.attention_backend == "math"
    # a ComfyUI single file records no head count: refused unless the node's num_attention_heads gives it
    with pytest.raises(CheckpointError, match="records no number of attention heads"):
        Loader.execute("sub/tiny_comfy.safetensors", "bfloat16", "auto")
    comfy_model, = Loader.execute("sub/tiny_comfy.safetensors", "bfloat16", "auto", 1)
    # a single file does not record its block size: frame-wise unless the rollout's frames_per_block says otherwise
    assert comfy_model.frames_per_block == 1 and comfy_model.trained_frames_per_block is None
    assert comfy_model.transformer.proj_out.weight.dtype == torch.bfloat16
    assert comfy_model.transformer.config.num_attention_heads == HEAD128["num_attention_heads"]
    folder_model, = Loader.execute("tiny_diffusers/", "default", "auto")
    assert folder_model.frames_per_block == 3
    for name in ("tiny_diffusers/", "sub/tiny_comfy.safetensors"):  # a folder and a single file, stored in fp8
        fp8_model, = Loader.execute(name, "fp8_e4m3fn", "auto", 1)
        assert is_fp8_stored(fp8_model.transformer.blocks[0].attn1.to_q)
        assert fp8_model.transformer.proj_out.weight.dtype == torch.float32  # the compute dtype on the CPU
    assert type(folder_model.patcher.model).__name__ == "ModelHolder"  # what ComfyUI's ModelPatcher manages


def test_text_encoder_from_comfy_single_file_and_bundled_demo(roots):
    (cond,) = TextEncode.execute("tiny_umt5.safetensors", "a corgi surfing", "default")
    embeds, extra = cond[0]
    assert embeds.shape == (1, 512, 32) and extra == {}
    tokens = (embeds.abs().sum(-1) > 0).sum().item()
    assert 2 <= tokens < 20  # pieces + </s>, zero after them
    (demo_cond,) = TextEncode.execute(DEMO, "a corgi surfing", "default")
    expected = roots["demo"].encode_prompt("a corgi surfing", device="cpu", dtype=torch.float32)
    torch.testing.assert_close(demo_cond[0][0], expected)
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        TextEncode.execute("no_tokenizer.safetensors", "a cat", "default")
    (fp8_cond,) = TextEncode.execute(DEMO, "a corgi surfing", "fp8_e4m3fn")  # fp8 weight storage: close, not equal
    error = torch.linalg.vector_norm(fp8_cond[0][0] - expected) / torch.linalg.vector_norm(expected)
    assert 0 < error <= 0.1, error


# -- rollout -------------------------------------------------------------------------------------------------------
def test_rollout_equals_the_pipeline_and_its_latent_is_raw_vae_space(roots):
    model, = Loader.execute(DEMO, "default", "auto")
    cond, = TextEncode.execute(DEMO, "a red circle moves left", "default")
    calls = []
    latent = generate_latents(model, RolloutRequest(cond, 7, 16, 32, 13, 0, "first block four steps"),
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
    images, = Decode.execute(latent, DEMO)
    video = WanStreamingDecoder(pipe.vae).decode_all(expected)  # the pipeline's decode of its latents
    video = ((video + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)
    assert images.shape == (13, 32, 16, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    torch.testing.assert_close(images, video, atol=2e-4, rtol=0)


def test_rollout_runs_a_model_trained_with_an_independent_first_frame(roots):
    """A checkpoint whose latent frame 0 is a block of its own (blocks [1, 3, 1] for 5 latent frames): the node
    reports three blocks and makes the pipeline's video."""
    model, = Loader.execute(DEMO, "default", "auto")  # chunk-wise: 3 latent frames
    cond, = TextEncode.execute(DEMO, "a red circle moves left", "default")
    pipe = roots["demo"]
    transformers = {id(t): t for t in (model.transformer, pipe.transformer)}.values()
    try:
        for transformer in transformers:
            transformer.register_to_config(independent_first_frame=True)
        calls = []
        latent = generate_latents(model, RolloutRequest(cond, 3, 16, 16, 17, 0, "one step"),
                                  on_progress=lambda done, total: calls.append((done, total)))
        expected = pipe(prompt_embeds=cond[0][0], num_frames=17, height=16, width=16,
                        generator=torch.Generator().manual_seed(3), output_type="latent").frames
    finally:
        for transformer in transformers:
            transformer.register_to_config(independent_first_frame=False)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    normalised = to_normalised(latent["samples"], model.latents_mean, model.latents_std)
    torch.testing.assert_close(normalised, expected, atol=1e-5, rtol=1e-5)


def test_an_empty_prompt_is_refused(roots):
    for prompt in ("", "   "):
        with pytest.raises(ValueError, match="the prompt is empty"):
            TextEncode.execute(DEMO, prompt, "default")


def test_a_frames_per_block_the_model_was_not_trained_for_is_said(roots, caplog):
    model, = Loader.execute(DEMO, "default", "auto")  # chunk-wise: 3 latent frames
    cond, = TextEncode.execute(DEMO, "a red circle moves left", "default")
    with caplog.at_level("WARNING", logger="oneforcing"):
        generate_latents(model, RolloutRequest(cond, 0, 16, 16, 5, 3, "one step"))
    assert not [r for r in caplog.records if "frames_per_block" in r.getMessage()]
    with caplog.at_level("WARNING"):
        generate_latents(model, RolloutRequest(cond, 0, 16, 16, 5, 1, "one step"))
    assert any("trained with 3 latent frames per block" in r.getMessage() for r in caplog.records)


def test_rollout_accepts_native_conditioning_and_initial_latent_shape(roots):
    model, = Loader.execute(DEMO, "default", "auto")
    native = [[torch.randn(1, 512, 32), {"pooled_output": None}]]
    empty = {"samples": torch.zeros(2, 16, 3, 2, 4)}
    latent, = Rollout.execute(model, native, 1, 832, 480, 81, 0, "one step", empty)
    assert latent["samples"].shape == (2, 16, 3, 2, 4)
    with pytest.raises(ValueError, match="width 4096, the model's text encoder width is 32"):
        Rollout.execute(model, [[torch.zeros(1, 512, 4096), {}]], 1, 32, 32, 5, 0, "one step")
    with pytest.raises(ValueError, match="2 entries"):
        Rollout.execute(model, native * 2, 1, 32, 32, 5, 0, "one step")


@pytest.mark.parametrize("width, height, length, message", [
    (40, 32, 5, "height and width must be positive multiples of 16, got 32x40"),  # the pipeline's own check
    (32, 24, 5, "height and width must be positive multiples of 16, got 24x32"),
    (32, 32, 0, r"length must be 1 \+ 4k \(e.g. 81\), got 0"),  # the layout's, naming the widget
    (32, 32, 6, r"length has 6 frames; the Wan VAE encodes 1 \+ 4k frames: use 5 or 9 frames"),
])
def test_rollout_rejects_bad_sizes(roots, width, height, length, message):
    model, = Loader.execute(DEMO, "default", "auto")
    cond = [[torch.zeros(1, 512, 32), {}]]
    with pytest.raises(ValueError, match=message):
        Rollout.execute(model, cond, 0, width, height, length, 0, "one step")


def test_size_0_is_the_size_the_model_recorded(roots):
    rollout = NODE_INFO["OneForcingRollout"]["input"]["required"]
    assert rollout["width"][1]["default"] == rollout["height"][1]["default"] == 0  # a fresh node fits its model
    assert "0 = the model's own size" in rollout["width"][1]["tooltip"]
    model, = Loader.execute(DEMO, "default", "auto")
    assert model.pipeline.default_video_size == {"num_frames": 9, "height": 16, "width": 32}
    cond = [[torch.zeros(1, 512, 32), {}]]
    latent, = Rollout.execute(model, cond, 0, 0, 0, 5, 0, "one step")
    assert latent["samples"].shape[3:] == (2, 4)
    latent, = Rollout.execute(model, cond, 0, 16, 0, 5, 0, "one step")  # each side on its own
    assert latent["samples"].shape[3:] == (2, 2)
    single, = Loader.execute("tiny_oneforcing.pt", "default", "auto")
    # a single file records nothing: Wan2.1's 832 x 480, as the pipeline's default
    assert single.pipeline.default_video_size == {"num_frames": 81, "height": 480, "width": 832}


def test_missing_models_are_refused_when_the_prompt_is_queued(roots):
    """The queue-time checks (ComfyUI's validate_inputs) name a model that is not there before anything runs."""
    check = {node.__name__: node.validate_inputs for node in NODES if "validate_inputs" in vars(node)}
    assert "OneForcingRollout" not in check
    assert check["OneForcingModelLoader"](model_name="tiny_oneforcing.pt") is True
    assert check["OneForcingModelLoader"](model_name=DEMO) is True
    problem = check["OneForcingModelLoader"](model_name="one_forcing.pt")
    assert problem.startswith("diffusion_models model 'one_forcing.pt': not found in ") and "unet" in problem
    assert "'..' is not allowed" in check["OneForcingModelLoader"](model_name="../x.pt")
    for node in ("OneForcingTextEncode", "OneForcingPromptSchedule"):
        assert check[node](text_encoder_name="tiny_umt5.safetensors") is True
        assert "text_encoders model 'umt5_xxl.safetensors': not found" in check[node](
            text_encoder_name="umt5_xxl.safetensors")
    assert check["OneForcingEncode"](vae_name="tiny_vae.safetensors") is True
    assert "vae model 'wan_2.1_vae.safetensors': not found" in check["OneForcingEncode"](
        vae_name="wan_2.1_vae.safetensors")
    assert check["OneForcingDecode"](vae_name=DEMO, tiny_vae=NO_TINY_VAE) is True
    assert "vae_approx model 'taew2_1.safetensors': not found" in check["OneForcingDecode"](
        vae_name=DEMO, tiny_vae="taew2_1.safetensors")


def test_missing_bundled_demo_is_refused_when_the_prompt_is_queued(roots, monkeypatch, tmp_path):
    monkeypatch.setenv("ONEFORCING_DEMO_DIR", str(tmp_path / "nowhere"))
    assert "the bundled demo model is not installed" in Loader.validate_inputs(model_name=DEMO)
    # the encoder's and decoder's VAE may come from a connected VAE, unknown at queue time: checked when they run
    assert Decode.validate_inputs(vae_name=DEMO, tiny_vae=NO_TINY_VAE) is True


def test_cancel_stops_between_blocks(roots):
    model, = Loader.execute(DEMO, "default", "auto")
    cond = [[torch.zeros(1, 512, 32), {}]]
    done = []
    with pytest.raises(InterruptedError):
        generate_latents(model, RolloutRequest(cond, 0, 32, 32, 17, 1, "one step"),
                         on_progress=lambda d, t: done.append(d), should_stop=lambda: len(done) >= 2)
    assert done == [1, 2]  # 5 blocks planned; stopped before the third


# -- decoder -------------------------------------------------------------------------------------------------------
def test_decoder_from_vae_folder_matches_a_full_decode(roots):
    vae = roots["vae"]
    raw = torch.randn(1, 16, 2, 2, 4)
    images, = Decode.execute({"samples": raw}, "tiny_vae.safetensors")
    assert images.shape == (5, 16, 32, 3)
    with torch.no_grad():
        full = vae.decode(raw).sample  # diffusers' decode takes raw latents
    expected = ((full.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="4 channels; Wan2.1 video latents have 16"):
        Decode.execute({"samples": torch.zeros(1, 4, 3, 4, 4)}, "tiny_vae.safetensors")
    with pytest.raises(TypeError, match="ComfyUI's VAE object"):
        Decode.execute({"samples": raw}, "tiny_vae.safetensors", vae=object())


# -- tiny preview VAE (vae_approx) ---------------------------------------------------------------------------------
def make_tiny_taehv(seed: int = 0) -> TinyWanVAE:
    """A small TAEHV-architecture VAE; its state dict is in the public taew2_1 key layout (other widths)."""
    torch.manual_seed(seed)
    model = TinyWanVAE(decoder_widths=(8, 8, 4, 4), encoder_width=4).eval()
    with torch.no_grad():  # the default init decodes to near-constant frames: widen it, centre the output on grey
        for param in model.parameters():
            param.mul_(1.5)
        model.decoder[22].bias.fill_(0.5)
    return model


@pytest.fixture(scope="session")
def taehv_tree(tmp_path_factory):
    """``root/vae_approx`` with a tiny TAEHV (safetensors, and a decoder-only .pth) and two files that are not one;
    ``root/vae/custom_stats/`` a diffusers Wan VAE folder whose config has its own latent statistics."""
    from diffusers import AutoencoderKLWan

    root = tmp_path_factory.mktemp("taehv")
    approx = root / "vae_approx"
    (approx / "sub").mkdir(parents=True)
    taehv = make_tiny_taehv()
    state = {k: v.contiguous() for k, v in taehv.state_dict().items()}
    save_file(state, str(approx / "taew2_1.safetensors"))
    torch.save({k: v for k, v in state.items() if k.startswith("decoder.")}, approx / "sub" / "taew2_1_decoder.pth")
    save_file({k: v.contiguous() for k, v in make_tiny_vae(5).state_dict().items()},
              str(approx / "wan_2.1_vae.safetensors"))  # a Wan VAE put in the wrong folder
    (approx / "damaged.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    mean, std = wan21_latent_stats()
    custom_mean, custom_std = [m + 0.3 for m in mean], [s * 1.7 for s in std]
    torch.manual_seed(6)
    AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=custom_mean,
                     latents_std=custom_std).save_pretrained(root / "vae" / "custom_stats")
    return {"taehv_root": root, "vae_approx": approx, "taehv": taehv, "custom_stats": (custom_mean, custom_std)}


@pytest.fixture
def tiny_roots(roots, taehv_tree):
    models = roots["models"]
    set_model_roots({
        "diffusion_models": [models / "diffusion_models", models / "unet"],
        "text_encoders": [models / "text_encoders", models / "clip"],
        "vae": [models / "vae", taehv_tree["taehv_root"] / "vae"],
        "vae_approx": [taehv_tree["vae_approx"]],
    })
    yield {**roots, **taehv_tree}  # the roots fixture resets the folders afterwards


def _tiny_reference(taehv: TinyWanVAE, raw: torch.Tensor, mean, std) -> torch.Tensor:
    """IMAGE [T, H, W, 3] of ``TinyWanStreamingDecoder`` fed the normalised latents one latent frame at a time."""
    latents = to_normalised(raw, mean, std)
    decoder = TinyWanStreamingDecoder(taehv)
    video = torch.cat([decoder.decode_block(latents[:, :, i : i + 1]) for i in range(raw.shape[2])], dim=2)
    return ((video + 1) / 2).clamp(0, 1)[0].permute(1, 2, 3, 0)


def test_decode_offers_the_tiny_vaes_of_vae_approx(tiny_roots, monkeypatch):
    info = NODE_INFO["OneForcingDecode"]
    # optional and last: workflows saved before it still load (their widget values keep their positions)
    assert info["input_order"] == {"required": ["samples", "vae_name"], "optional": ["vae", "tiny_vae"]}
    kind, options = info["input"]["optional"]["tiny_vae"]
    assert kind == "COMBO" and options["default"] == "none"
    files = ["damaged.safetensors", "sub/taew2_1_decoder.pth", "taew2_1.safetensors", "wan_2.1_vae.safetensors"]
    assert list_models("vae_approx") == ["none", *files]  # files only: no folder, no bundled demo
    # outside ComfyUI without set roots: $ONEFORCING_MODELS_DIR/vae_approx, else nothing but "none"
    set_model_roots(None)
    monkeypatch.delenv("ONEFORCING_MODELS_DIR", raising=False)
    assert list_models("vae_approx") == ["none"]
    monkeypatch.setenv("ONEFORCING_MODELS_DIR", str(tiny_roots["taehv_root"]))
    assert list_models("vae_approx") == ["none", *files]
    raw = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    images, = Decode.execute({"samples": raw}, "custom_stats/", None, "taew2_1.safetensors")
    torch.testing.assert_close(images, _tiny_reference(tiny_roots["taehv"], raw, *tiny_roots["custom_stats"]),
                               atol=1e-6, rtol=0)


def test_tiny_vae_decodes_the_normalised_latents_with_the_wan_frame_count(tiny_roots):
    raw = 2 * torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    images, = Decode.execute({"samples": raw}, "tiny_vae.safetensors", None, "taew2_1.safetensors")
    wan, = Decode.execute({"samples": raw}, "tiny_vae.safetensors")
    assert images.shape == wan.shape == (9, 16, 32, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    assert (images - wan).abs().max() > 0.1  # a different decoder really ran
    # a single Wan VAE file records no statistics: Wan2.1's (diffusers' defaults) normalise the LATENT
    taehv, (mean, std) = tiny_roots["taehv"], wan21_latent_stats()
    torch.testing.assert_close(images, _tiny_reference(taehv, raw, mean, std), atol=1e-6, rtol=0)
    full = ((taehv.decode(to_normalised(raw, mean, std)) + 1) / 2)[0].permute(1, 2, 3, 0)
    torch.testing.assert_close(images, full, atol=1e-4, rtol=0)  # streaming = one full decode
    # a decoder-only .pth in a subfolder gives the same frames; the model is managed like the other loaders'
    from_pth, = Decode.execute({"samples": raw}, "tiny_vae.safetensors", None, "sub/taew2_1_decoder.pth")
    torch.testing.assert_close(from_pth, images, atol=1e-6, rtol=0)
    patcher = load_tiny_vae("taew2_1.safetensors")
    assert type(patcher.model).__name__ == "ModelHolder" and patcher.model.tiny_vae.dtype == torch.float32


def test_tiny_vae_takes_the_latent_statistics_of_the_chosen_wan_vae(tiny_roots, monkeypatch):
    raw = 2 * torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    taehv = tiny_roots["taehv"]
    custom, = Decode.execute({"samples": raw}, "custom_stats/", None, "taew2_1.safetensors")  # its config.json
    torch.testing.assert_close(custom, _tiny_reference(taehv, raw, *tiny_roots["custom_stats"]), atol=1e-6, rtol=0)
    default = _tiny_reference(taehv, raw, *wan21_latent_stats())
    assert (custom - default).abs().max() > 0.05
    demo, = Decode.execute({"samples": raw}, DEMO, None, "taew2_1.safetensors")  # the demo's vae/config.json
    demo_vae = tiny_roots["demo"].vae.config
    torch.testing.assert_close(demo, _tiny_reference(taehv, raw, demo_vae.latents_mean, demo_vae.latents_std),
                               atol=1e-6, rtol=0)
    # only the tiny VAE at hand (the bundled demo not installed): Wan2.1's statistics, no error
    monkeypatch.setenv("ONEFORCING_DEMO_DIR", str(tiny_roots["taehv_root"] / "nowhere"))
    alone, = Decode.execute({"samples": raw}, DEMO, None, "taew2_1.safetensors")
    torch.testing.assert_close(alone, default, atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="bundled demo model is not installed"):
        Decode.execute({"samples": raw}, DEMO)  # the Wan VAE path still needs it
    with pytest.raises(ValueError, match="connected VAE has 48 latent channels"):
        Decode.execute({"samples": raw}, DEMO, SimpleNamespace(latent_channels=48), "taew2_1.safetensors")


def test_no_tiny_vae_leaves_the_wan_vae_decode_bit_identical(tiny_roots):
    raw = torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(3))
    images, = Decode.execute({"samples": raw}, "tiny_vae.safetensors")
    assert torch.equal(Decode.execute({"samples": raw}, "tiny_vae.safetensors", None, "none")[0], images)
    # the decode as it was before tiny VAEs existed: the Wan VAE streamed one latent frame at a time
    vae, pieces = tiny_roots["vae"], []
    decoder = WanStreamingDecoder(vae)
    with torch.no_grad():
        for index in range(raw.shape[2]):
            video = decoder.decode_block(normalize_latents(raw[:, :, index : index + 1].float(), vae))
            pieces.append(((video.float() + 1.0) / 2.0).clamp_(0.0, 1.0))
    video = torch.cat(pieces, dim=2)
    assert torch.equal(images, video.permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[3:], 3))


@pytest.mark.parametrize("name, error, message", [
    ("missing.safetensors", FileNotFoundError, r"vae_approx model 'missing.safetensors': not found in .*vae_approx"),
    ("../../x", ValueError, r"vae_approx model '\.\./\.\./x': '\.\.' is not allowed"),
    ("sub/../../secret.pth", ValueError, r"'\.\.' is not allowed"),
    ("/etc/passwd", ValueError, "absolute path"),
    ("", ValueError, "non-empty"),
    ("sub", FileNotFoundError, "is a folder; choose a weights file"),
    (DEMO, FileNotFoundError, "not found in"),
    ("wan_2.1_vae.safetensors", CheckpointError, r"vae_approx.wan_2\.1_vae\.safetensors: not a TAEHV"),
    ("damaged.safetensors", CheckpointError, r"vae_approx.damaged\.safetensors: not a readable safetensors file"),
])
def test_bad_tiny_vae_choices_give_clear_errors(tiny_roots, name, error, message):
    with pytest.raises(error, match=message):
        Decode.execute({"samples": torch.zeros(1, 16, 1, 2, 2)}, "tiny_vae.safetensors", None, name)


def test_decode_fingerprint_follows_the_tiny_vae_file(tiny_roots):
    fingerprint = Decode.fingerprint_inputs
    wan = definitions.file_fingerprint("vae", "tiny_vae.safetensors")
    assert fingerprint(vae_name="tiny_vae.safetensors") == fingerprint(vae_name="tiny_vae.safetensors",
                                                                       tiny_vae="none") == wan
    path = tiny_roots["vae_approx"] / "taew2_1.safetensors"
    before = fingerprint(vae_name="tiny_vae.safetensors", tiny_vae="taew2_1.safetensors")
    assert before == (wan, ("taew2_1.safetensors", os.stat(path).st_mtime_ns))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert fingerprint(vae_name="tiny_vae.safetensors", tiny_vae="taew2_1.safetensors") != before


def test_shipped_workflow_decodes_with_a_tiny_vae(tiny_roots):
    import json

    from test_workflows import run_prompt

    prompt = json.loads((REPO / "workflows/api/One-Forcing text to video.json").read_text())
    decode = next(n for n in prompt.values() if n["class_type"] == "OneForcingDecode")
    assert decode["inputs"]["tiny_vae"] == "none"  # the shipped graphs keep the Wan VAE
    results = run_prompt(prompt, {"OneForcingRollout": {"width": 32, "height": 16, "length": 9},
                                  "OneForcingDecode": {"tiny_vae": "taew2_1.safetensors"}})
    by_type = {prompt[k]["class_type"]: v for k, v in results.items()}
    latent, images = by_type["OneForcingRollout"][0], by_type["OneForcingDecode"][0]
    assert images.shape == (9, 16, 32, 3)
    demo_vae = tiny_roots["demo"].vae.config
    expected = _tiny_reference(tiny_roots["taehv"], latent["samples"], demo_vae.latents_mean, demo_vae.latents_std)
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_rollout_runs_under_inference_mode_like_comfyui(roots):
    """ComfyUI executes every node under ``torch.inference_mode()``; the conditioning is then an inference tensor."""
    model, = Loader.execute(DEMO, "default", "auto")
    with torch.inference_mode():
        cond, = TextEncode.execute(DEMO, "a red circle moves left", "default")
        latent, = Rollout.execute(model, cond, 3, 16, 16, 5, 0, "one step")
    plain, = Rollout.execute(model, [[cond[0][0].clone(), {}]], 3, 16, 16, 5, 0, "one step")
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


# -- prompt schedule -----------------------------------------------------------------------------------------------
SCHEDULE = "0: a red circle moves left\n\n# the switch lands on the next block start\n13: a cat on the beach\n"


def test_prompt_schedule_node_encodes_each_range_and_marks_its_frames(roots):
    from oneforcing.nodes.sampling import SCHEDULE_KEY

    (cond,) = Schedule.execute(DEMO, SCHEDULE, "default")
    assert [entry[1][SCHEDULE_KEY] for entry in cond] == [(0, 13), (13, None)]
    for entry, text in zip(cond, ("a red circle moves left", "a cat on the beach")):
        (single,) = TextEncode.execute(DEMO, text, "default")
        torch.testing.assert_close(entry[0], single[0][0])
    (whole,) = Schedule.execute(DEMO, "a corgi surfing", "default")  # one line, no frame: whole video
    assert len(whole) == 1 and whole[0][1][SCHEDULE_KEY] == (0, None)
    (ranged,) = Schedule.execute(DEMO, "0-8: a cat\n8-33: a corgi", "default")
    assert [e[1][SCHEDULE_KEY] for e in ranged] == [(0, 8), (8, 33)]


@pytest.mark.parametrize("schedule, message", [
    ("", "the prompt schedule is empty"),
    ("10: a cat", "gap: frames 0..9 have no prompt"),
    ("0-20: a cat\n30: a corgi", "gap: frames 20..29 have no prompt"),
    ("0-40: a cat\n30: a corgi", "prompt ranges overlap"),
    ("40: a corgi\n0: a cat", "line 2 starts at frame 0, not after line 1 .frame 40.: list the prompts in frame order"),
    ("0: a cat\n0: a corgi", "line 2 starts at frame 0, not after line 1"),
    ("0: a cat\na corgi", "line 2 .'a corgi'.: each line needs its first video frame"),
    ("0: a cat\n40:   ", "the prompt starting at frame 40 is empty"),
    ('[{"start": 0, "prompt": "a cat"', "prompt schedule is not valid JSON"),  # a studio download, cut short
    ('[{"start": 0, "end": 9, "text": "a cat"}]', "a prompt range needs keys 'start' and 'prompt'"),
])
def test_bad_prompt_schedules_give_clear_errors(schedule, message):
    from oneforcing.nodes.sampling import parse_schedule_text

    with pytest.raises(ValueError, match=message):
        parse_schedule_text(schedule)


def test_rollout_with_a_prompt_schedule_equals_the_pipeline(roots):
    model, = Loader.execute(DEMO, "default", "auto")  # chunk-wise: 3 latent frames
    cond, = Schedule.execute(DEMO, SCHEDULE, "default")
    latent, = Rollout.execute(model, cond, 5, 16, 16, 33, 0, "one step")
    first, second = cond[0][0][0], cond[1][0][0]
    expected = roots["demo"](prompt_schedule={0: first[None], 13: second[None]}, num_frames=33, height=16, width=16,
                             generator=torch.Generator().manual_seed(5), output_type="latent").frames
    normalised = to_normalised(latent["samples"], model.latents_mean, model.latents_std)
    torch.testing.assert_close(normalised, expected, atol=1e-5, rtol=1e-5)
    # frame 13 rounds up to the block at latent frame 6 (video frame 21): blocks before it are the first prompt's
    single, = Rollout.execute(model, [[cond[0][0], {}]], 5, 16, 16, 33, 0, "one step")
    torch.testing.assert_close(latent["samples"][:, :, :6], single["samples"][:, :, :6])
    assert not torch.allclose(latent["samples"][:, :, 6:], single["samples"][:, :, 6:])


@pytest.mark.parametrize("schedule, length, message", [
    ("0: a cat\n40: a corgi", 33, r"prompt switch at frame 40 .'a corgi'. is past the end of the video .frames 0..32."),
    ("0: a cat\n30: a corgi", 33, "frame 30 .'a corgi'. rounds up to the block starting at video frame 33, past"),
    ("0: a cat\n13: a corgi\n17: a wave", 33, "both land on the block starting at video frame 21"),
])
def test_rollout_rejects_schedules_that_do_not_fit_the_video(roots, schedule, length, message):
    model, = Loader.execute(DEMO, "default", "auto")
    cond, = Schedule.execute(DEMO, schedule, "default")
    with pytest.raises(ValueError, match=message):
        Rollout.execute(model, cond, 0, 16, 16, length, 0, "one step")


def endless_latents(pipe, latent_frames: int, seed: int, **kwargs) -> torch.Tensor:
    """The first ``latent_frames`` latent frames of ``pipe.stream(num_frames=None)``: the CLI's endless run."""
    stream, made = pipe.stream(num_frames=None, generator=torch.Generator().manual_seed(seed), output_type="latent",
                               **kwargs), []
    for latents in stream:
        made.append(latents)
        if sum(m.shape[2] for m in made) >= latent_frames:
            break
    stream.close()
    return torch.cat(made, dim=2)[:, :, :latent_frames]


def test_noise_per_block_reproduces_a_studio_schedule_as_the_endless_stream_bit_for_bit(roots, one_thread):
    model, = Loader.execute(DEMO, "default", "auto")  # chunk-wise: 3 latent frames
    studio = json.dumps([{"start": 0, "prompt": "a red circle moves left"},
                         {"start": 13, "end": 33, "prompt": "a cat on the beach"}])  # as the studio downloads it
    cond, = Schedule.execute(DEMO, studio, "default")
    latent, = Rollout.execute(model, cond, 5, 16, 16, 33, 0, "one step", noise=BLOCK_NOISE)
    first, second = cond[0][0][0], cond[1][0][0]
    expected = endless_latents(roots["demo"], 9, 5, prompt_schedule={0: first[None], 13: second[None]}, height=16,
                               width=16, denoising_timesteps=[1000])
    assert torch.equal(latent["samples"], to_raw(expected, model.latents_mean, model.latents_std))
    whole, = Rollout.execute(model, cond, 5, 16, 16, 33, 0, "one step")  # the default: every workflow unchanged
    assert not torch.allclose(whole["samples"], latent["samples"])
    with pytest.raises(ValueError, match="the prompt schedule ends at video frame 33 but length is 37: set length "
                                         "to 33"):
        Rollout.execute(model, cond, 5, 16, 16, 37, 0, "one step", noise=BLOCK_NOISE)
    # a length that ends inside a block: the stream's first frames, whatever the length
    single = [[first[None], {}]]
    short, = Rollout.execute(model, single, 5, 16, 16, 29, 0, "one step", noise=BLOCK_NOISE)
    long, = Rollout.execute(model, single, 5, 16, 16, 33, 0, "one step", noise=BLOCK_NOISE)
    assert short["samples"].shape[2] == 8 and torch.equal(short["samples"], long["samples"][:, :, :8])
    with pytest.raises(ValueError, match="noise must be one of"):
        Rollout.execute(model, single, 5, 16, 16, 29, 0, "one step", noise="per frame")


def test_rollout_refuses_a_schedule_mixed_with_plain_conditioning(roots):
    model, = Loader.execute(DEMO, "default", "auto")
    cond, = Schedule.execute(DEMO, SCHEDULE, "default")
    with pytest.raises(ValueError, match="mixes prompt-schedule entries with plain ones"):
        Rollout.execute(model, cond + [[torch.zeros(1, 512, 32), {}]], 0, 16, 16, 33, 0, "one step")


# -- start image / context and the rolling cache -------------------------------------------------------------------
def _start_image(height: int = 24, width: int = 20) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] in 0..1 (not the video's size: the encoder resizes it)."""
    generator = torch.Generator().manual_seed(3)
    return torch.rand(1, height, width, 3, generator=generator)


def test_image_to_video_equals_the_pipeline_and_starts_with_the_image(roots):
    pipe = roots["demo"]
    model, = Loader.execute(DEMO, "default", "auto")
    cond, = TextEncode.execute(DEMO, "a red circle moves left", "default")
    image = _start_image()
    context, = Encode.execute(image, DEMO, 16, 16)
    assert context["samples"].shape == (1, 16, 1, 2, 2)
    latent, = Rollout.execute(model, cond, 2, 832, 480, 17, 0, "one step", None, context)  # size from context
    samples = latent["samples"]
    assert samples.shape == (1, 16, 5, 2, 2)
    torch.testing.assert_close(samples[:, :, :1], context["samples"], atol=1e-5, rtol=1e-5)
    expected = pipe(prompt_embeds=cond[0][0], image=image[0].permute(2, 0, 1), num_frames=17, height=16, width=16,
                    generator=torch.Generator().manual_seed(2), output_type="latent").frames
    normalised = to_normalised(samples, model.latents_mean, model.latents_std)
    torch.testing.assert_close(normalised, expected, atol=1e-5, rtol=1e-5)


def test_video_extension_continues_a_clip_with_a_rolling_cache(roots):
    pipe = roots["demo"]
    model, = Loader.execute(DEMO, "default", "auto")
    cond, = TextEncode.execute(DEMO, "a corgi surfing", "default")
    clip = torch.rand(5, 16, 16, 3, generator=torch.Generator().manual_seed(4))  # 5 frames = 2 latent frames
    context, = Encode.execute(clip, DEMO, 16, 16)
    assert context["samples"].shape == (1, 16, 2, 2, 2)
    latent, = Rollout.execute(model, cond, 9, 16, 16, 33, 1, "one step", None, context, 3, 2, False)
    expected = pipe(prompt_embeds=cond[0][0], context_latents=to_normalised(context["samples"], model.latents_mean,
                                                                             model.latents_std),
                    num_frames=33, height=16, width=16, frames_per_block=1, window_frames=3, sink_frames=2,
                    generator=torch.Generator().manual_seed(9), output_type="latent").frames
    normalised = to_normalised(latent["samples"], model.latents_mean, model.latents_std)
    torch.testing.assert_close(normalised, expected, atol=1e-5, rtol=1e-5)
    full, = Rollout.execute(model, cond, 9, 16, 16, 33, 1, "one step", None, context)
    # sink 2 + window 3 (the block being made included): frame 5 is the first made after frame 2 was evicted
    torch.testing.assert_close(full["samples"][:, :, :5], latent["samples"][:, :, :5], atol=1e-5, rtol=1e-5)
    assert (full["samples"][:, :, 5:] - latent["samples"][:, :, 5:]).abs().amax() > 1e-3


def test_rolling_cache_with_a_schedule_and_kept_sink_reports_every_block(roots):
    """Window + sink + a prompt switch that keeps the sink: the settings reach the pipeline (which the equality tests
    above check) and every generated block reports progress."""
    model, = Loader.execute(DEMO, "default", "auto")
    cond, = Schedule.execute(DEMO, "0: a cat\n20: a corgi surfing", "default")
    done = []
    request = RolloutRequest(cond, 1, 16, 16, 41, 1, "one step", window_frames=4, sink_frames=1)
    latent = generate_latents(model, replace(request, keep_sink_on_switch=True),
                              on_progress=lambda d, t: done.append((d, t)))
    assert latent["samples"].shape == (1, 16, 11, 2, 2) and torch.isfinite(latent["samples"]).all()
    assert done == [(d, 11) for d in range(1, 12)]
    recomputed = generate_latents(model, request)
    torch.testing.assert_close(recomputed["samples"][:, :, :6], latent["samples"][:, :, :6])  # before the switch
    assert not torch.allclose(recomputed["samples"][:, :, 6:], latent["samples"][:, :, 6:])  # the sink differs


@pytest.mark.parametrize("kwargs, message", [
    (dict(context_latent={"samples": torch.zeros(1, 4, 1, 2, 2)}), "context_latent has 4 channels"),
    # the widget's name, not the pipeline's (num_frames)
    (dict(context_latent={"samples": torch.zeros(1, 16, 5, 2, 2)}), "^length 17 leaves no frame to generate after "
     "the context_latent's 17 video frames"),
    (dict(context_latent={"samples": torch.zeros(1, 16, 1, 3, 2)}), "context_latent is 16x24 pixels; the model "
     "makes videos whose width and height are multiples of 16"),
    (dict(window_frames=2), r"window_frames=2 must hold a whole block \(3 latent frames\)"),
    (dict(window_frames=-1), "window_frames and sink_frames must be >= 0"),
])
def test_rollout_rejects_bad_context_and_cache_settings(roots, kwargs, message):
    model, = Loader.execute(DEMO, "default", "auto")
    cond = [[torch.zeros(1, 512, 32), {}]]
    with pytest.raises(ValueError, match=message):
        Rollout.execute(model, cond, 0, 16, 16, 17, 0, "one step", **kwargs)


@pytest.mark.parametrize("images, width, message", [
    (torch.rand(3, 16, 16, 3), 16,
     "images has 3 frames; the Wan VAE encodes 1 \\+ 4k frames: use 1 or 5 frames .one image, or a clip"),
    (torch.rand(16, 16, 3), 16, "images must be a ComfyUI IMAGE"),
    (torch.rand(1, 16, 16, 3), 12, "width must be a positive multiple of 16 .what the rollout makes., got 12"),
    (torch.rand(1, 16, 16, 3), 24, "width must be a positive multiple of 16"),  # the VAE's 8 is not enough
])
def test_encoder_rejects_bad_images(roots, images, width, message):
    with pytest.raises(ValueError, match=message):
        Encode.execute(images, DEMO, width, 16)


def test_workflow_inputs_are_copied_into_comfyui_input_folder_without_overwriting(tmp_path):
    from oneforcing.nodes.workflow_inputs import WORKFLOW_INPUTS, install_workflow_inputs

    assert install_workflow_inputs() == []  # outside ComfyUI, with no folder given: nothing
    shipped = sorted(p.name for p in WORKFLOW_INPUTS.iterdir())
    assert "oneforcing_demo_start.png" in shipped
    copied = install_workflow_inputs(tmp_path / "input")
    assert sorted(p.name for p in copied) == shipped
    assert (tmp_path / "input" / shipped[0]).read_bytes() == (WORKFLOW_INPUTS / shipped[0]).read_bytes()
    (tmp_path / "input" / shipped[0]).write_bytes(b"the user's own file")
    assert install_workflow_inputs(tmp_path / "input") == []  # never overwrites
    assert (tmp_path / "input" / shipped[0]).read_bytes() == b"the user's own file"


def test_requirements_never_change_the_torch_of_a_comfyui_install():
    """requirements.txt goes into ComfyUI's own Python: it must accept the torch there (an exact pin or an
    instruction to install one would replace it and break the torchvision ComfyUI needs)."""
    import tomllib

    text = (REPO / "requirements.txt").read_text()
    requirements = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert requirements == declared
    assert any(r.startswith("torch>=") for r in requirements) and not any(r.startswith("torchvision") for r in requirements)
    assert "torch==" not in text and "Keep ComfyUI's torch as it is" in text


def test_cpu_thread_policy_runs_on_the_idle_cpus_and_restores_torch_setting(monkeypatch):
    before = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= runtime.idle_cpus() <= usable
    monkeypatch.setattr(runtime, "idle_cpus", lambda: 1)  # another process holds every other core
    with runtime.cpu_threads(torch.device("cpu")) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setattr(runtime, "idle_cpus", lambda: 10**6)  # never more threads than torch was given
    with runtime.cpu_threads(torch.device("cpu")) as threads:
        assert threads == before
    with runtime.cpu_threads(torch.device("meta")) as threads:  # not the CPU: left alone
        assert threads == torch.get_num_threads() == before
