"""The One-Forcing LoRA node on tiny real models and real PEFT (no ComfyUI needed).

The LoRA files are written as ``export`` writes them (``test_nodes.lora_file``) into the tiny model tree's
``models/loras``; the expected latents come from a separate copy of the demo pipeline given the same file through
diffusers' own ``load_lora_weights`` / ``set_adapters``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import make_tiny_pipeline
from test_nodes import lora_file, model_tree, roots  # noqa: F401 (fixtures)

from oneforcing.nodes.definitions import OneForcingLora as Lora
from oneforcing.nodes.definitions import OneForcingModelLoader as Loader
from oneforcing.nodes.definitions import OneForcingRollout as Rollout
from oneforcing.nodes.definitions import OneForcingTextEncode as TextEncode
from oneforcing.nodes.folders import BUNDLED_DEMO, list_models, model_roots, resolve_model, set_model_roots
from oneforcing.nodes.latents import to_normalised
from oneforcing.pipelines.lora import loaded_adapters

pytest.importorskip("peft")

STYLE, SUBJECT = "tiny_style.safetensors", "sub/tiny_subject.safetensors"
SIZE = dict(seed=3, width=16, height=16, length=9, frames_per_block=0, timesteps="one step")


@pytest.fixture
def demo(roots):
    """(a freshly loaded bundled demo model, the CONDITIONING of a prompt)."""
    model, = Loader.execute(BUNDLED_DEMO, "default", "auto")
    cond, = TextEncode.execute(BUNDLED_DEMO, "a red circle moves left", "default")
    return model, cond


def rollout(model, cond) -> torch.Tensor:
    latent, = Rollout.execute(model, cond, **SIZE)
    return latent["samples"]


def with_adapters(roots, cond, files_and_strengths) -> tuple:
    """(normalised latents, latent mean, latent std) of the rollout's video from another copy of the demo pipeline,
    given the files by ``load_lora_weights`` and their strengths by ``set_adapters``."""
    pipe = make_tiny_pipeline(seed=0, frames_per_block=3)  # the weights of the demo in the tree
    names = []
    for i, (name, _) in enumerate(files_and_strengths):
        pipe.load_lora_weights(str(roots["models"] / "loras" / name), adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    pipe.set_adapters(names, [strength for _, strength in files_and_strengths])
    normalised = pipe(prompt_embeds=cond[0][0], num_frames=9, height=16, width=16, denoising_timesteps=[1000],
                      generator=torch.Generator().manual_seed(SIZE["seed"]), output_type="latent").frames
    mean, std = pipe.vae.config.latents_mean, pipe.vae.config.latents_std
    return normalised, mean, std


def assert_as_pipeline(samples, expected) -> None:
    normalised, mean, std = expected
    torch.testing.assert_close(to_normalised(samples, mean, std), normalised, atol=1e-5, rtol=1e-5)


def test_lora_node_equals_the_pipeline_with_load_lora_weights_at_the_same_strength(roots, demo):
    model, cond = demo
    lora_model, = Lora.execute(model, STYLE, 0.7)
    samples = rollout(lora_model, cond)
    assert_as_pipeline(samples, with_adapters(roots, cond, [(STYLE, 0.7)]))
    assert not torch.allclose(samples, rollout(model, cond), atol=1e-3)  # the LoRA does change the video


def test_chained_lora_nodes_stack_as_set_adapters_with_both(roots, demo):
    model, cond = demo
    stacked, = Lora.execute(Lora.execute(model, STYLE, 0.5)[0], SUBJECT, -0.8)
    assert [choice.strength for choice in stacked.loras] == [0.5, -0.8]
    assert_as_pipeline(rollout(stacked, cond), with_adapters(roots, cond, [(STYLE, 0.5), (SUBJECT, -0.8)]))
    # one file chained twice is one adapter at the sum of the strengths (the file's content names it)
    twice, = Lora.execute(Lora.execute(model, STYLE, 0.3)[0], STYLE, 0.4)
    assert_as_pipeline(rollout(twice, cond), with_adapters(roots, cond, [(STYLE, 0.7)]))
    assert len(loaded_adapters(model.pipeline)) == 1


@pytest.mark.parametrize("lora_first", [False, True], ids=["plain first", "LoRA first"])
def test_branches_of_one_loaded_model_each_get_their_own_video(roots, demo, lora_first):
    """ComfyUI caches node outputs and runs branches in any order: a LoRA node never changes the model it was given,
    so the plain branch, a re-run with the LoRA node bypassed and strength 0 all give the base video exactly."""
    model, cond = demo
    expected_lora = with_adapters(roots, cond, [(STYLE, 1.0)])
    lora_model, = Lora.execute(model, STYLE, 1.0)
    if lora_first:
        assert_as_pipeline(rollout(lora_model, cond), expected_lora)
    base = rollout(model, cond)
    assert torch.equal(base, rollout(Loader.execute(BUNDLED_DEMO, "default", "auto")[0], cond))  # never had a LoRA
    assert model.loras == () and lora_model.loras[0].strength == 1.0
    assert lora_model.pipeline is model.pipeline  # the loaded weights are shared, not copied
    assert_as_pipeline(rollout(lora_model, cond), expected_lora)
    assert torch.equal(rollout(model, cond), base)  # the bypassed LoRA node: the plain model's video
    assert torch.equal(rollout(Lora.execute(model, STYLE, 0.0)[0], cond), base)
    assert loaded_adapters(model.pipeline) == []  # a plain rollout runs the transformer without PEFT layers


def test_lora_rollout_under_inference_mode_like_comfyui(roots, demo):
    """ComfyUI executes every node under ``torch.inference_mode()``: the adapters are then loaded in it."""
    model, cond = demo
    with torch.inference_mode():
        lora_model, = Lora.execute(model, STYLE, 0.7)
        samples = rollout(lora_model, cond)
        base = rollout(model, cond)
        again = rollout(lora_model, cond)
    assert torch.equal(samples, again)
    assert_as_pipeline(samples, with_adapters(roots, cond, [(STYLE, 0.7)]))
    assert torch.equal(base, rollout(model, cond))


def test_lora_list_offers_safetensors_only_and_the_bundled_demo_loras(roots, monkeypatch):
    (roots["models"] / "loras" / "pickled.pt").write_bytes(b"not read")
    try:
        assert list_models("loras") == ["sub/tiny_subject.safetensors", "tiny_style.safetensors"]
        with pytest.raises(ValueError, match=r"only \.safetensors files are read"):
            resolve_model("loras", "pickled.pt")
        assert Lora.validate_inputs("pickled.pt") is not True
    finally:
        (roots["models"] / "loras" / "pickled.pt").unlink()
    # outside set_model_roots: $ONEFORCING_MODELS_DIR's loras/, then oneforcing-demo-loras/ beside the bundled demo
    bundled = roots["demo_dir"].parent / "oneforcing-demo-loras"
    lora_file(roots["demo"].transformer, bundled / "demo_style.safetensors")
    set_model_roots(None)
    monkeypatch.setenv("ONEFORCING_MODELS_DIR", str(roots["models"]))
    try:
        assert model_roots("loras") == [roots["models"] / "loras", bundled]
        assert list_models("loras") == ["demo_style.safetensors", "sub/tiny_subject.safetensors", STYLE]
        assert resolve_model("loras", "demo_style.safetensors") == bundled / "demo_style.safetensors"
    finally:
        shutil.rmtree(bundled)


def test_bad_lora_files_are_refused_naming_the_file(roots, demo):
    model, _ = demo
    assert "missing.safetensors" in Lora.validate_inputs("missing.safetensors")  # refused when queued
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Lora.execute(model, "missing.safetensors", 1.0)
    corrupt = roots["models"] / "loras" / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    try:
        with pytest.raises(ValueError, match=r"corrupt\.safetensors cannot be read as a LoRA"):
            Lora.execute(model, "corrupt.safetensors", 1.0)
    finally:
        corrupt.unlink()
    # a LoRA of the demo on a model of another width: the library's refusal, naming the file and the first key
    other, = Loader.execute("tiny_oneforcing.pt", "float32", "auto")
    with pytest.raises(ValueError, match=r"tiny_style\.safetensors: LoRA key '.+' has shape .+ made for another"):
        Lora.execute(other, STYLE, 1.0)
    assert other.loras == () and loaded_adapters(other.pipeline) == []  # nothing changed
    with pytest.raises(TypeError, match="One-Forcing Model Loader"):
        Lora.execute({"not": "a model"}, STYLE, 1.0)


def test_a_lora_file_rewritten_after_the_node_read_it_is_refused_at_the_rollout(roots, demo):
    model, cond = demo
    path = roots["models"] / "loras" / "rewritten.safetensors"
    lora_file(roots["demo"].transformer, path, seed=5)
    try:
        lora_model, = Lora.execute(model, "rewritten.safetensors", 1.0)
        fingerprint = Lora.fingerprint_inputs(lora_name="rewritten.safetensors")
        lora_file(roots["demo"].transformer, path, seed=6)
        os.utime(path, ns=(1, 1))  # a new modification time even on a coarse clock
        assert Lora.fingerprint_inputs(lora_name="rewritten.safetensors") != fingerprint  # ComfyUI re-runs the node
        with pytest.raises(ValueError, match=r"rewritten\.safetensors changed on disk"):
            rollout(lora_model, cond)
    finally:
        path.unlink()
