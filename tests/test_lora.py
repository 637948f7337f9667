"""LoRA on the pipeline: diffusers' Wan loader with real PEFT on a tiny real model.

One adapter (random lora_A/lora_B for every attention and feed-forward layer) is written in each layout Wan LoRAs ship
in; the expected output of an adapter at strength s is that of a copy of the base model whose weights were patched by
hand with W + s * B @ A, an independent computation of what the loader must do.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline
from safetensors.torch import save_file

from oneforcing import OneForcingScheduler, causal_rollout
from oneforcing.pipelines.lora import adapter_state

pytest.importorskip("peft")

ARGS = dict(num_frames=5, height=32, width=48, output_type="latent")
RANK = 4
_ORIGINAL = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
             "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def _targets(transformer):
    """diffusers names of the layers a Wan LoRA adapts: every attention projection and both feed-forward layers."""
    names = []
    for i in range(len(transformer.blocks)):
        names += [f"blocks.{i}.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"blocks.{i}.ffn.net.0.proj", f"blocks.{i}.ffn.net.2"]
    return names


def make_adapter(transformer, seed=0, rank=RANK, scale=0.1):
    """{diffusers layer name: (A [r, in], B [out, r])}."""
    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for name in _targets(transformer):
        layer = transformer.get_submodule(name)
        adapter[name] = (torch.randn(rank, layer.in_features, generator=g) * scale,
                         torch.randn(layer.out_features, rank, generator=g) * scale)
    return adapter


def _original_name(name):
    for ours, theirs in _ORIGINAL.items():
        name = name.replace(ours, theirs)
    return name


def in_layout(adapter, layout):
    """The adapter as a state dict in one of the file layouts (alpha = 2 * rank where the layout has alphas, with the
    weights pre-scaled by exact powers of two so that every layout holds the same adapter)."""
    out = {}
    for name, (a, b) in adapter.items():
        if layout == "diffusers":
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = a, b
        elif layout == "wan":
            key = f"diffusion_model.{_original_name(name)}"
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a, b
        else:  # kohya/musubi and ComfyUI: lora_down / lora_up with an alpha per layer
            key = ("lora_unet_" + _original_name(name).replace(".", "_") if layout == "kohya"
                   else f"diffusion_model.{_original_name(name)}")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = a / 2, b
            out[f"{key}.alpha"] = torch.tensor(2.0 * a.shape[0])
    return out


def patched_by_hand(adapters_and_strengths):
    """The base tiny pipeline with transformer weights W + sum(s * B @ A)."""
    copy = make_tiny_pipeline()
    with torch.no_grad():
        for adapter, strength in adapters_and_strengths:
            for name, (a, b) in adapter.items():
                copy.transformer.get_submodule(name).weight += strength * (b @ a)
    return copy


def _latents(pipe, prompt="a corgi surfing a wave"):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **ARGS).frames


@pytest.fixture
def pipe():
    return make_tiny_pipeline()


@pytest.mark.parametrize("layout", ["diffusers", "wan", "comfyui", "kohya"])
def test_each_layout_loads_to_the_same_adapter(pipe, tmp_path, layout):
    adapter = make_adapter(pipe.transformer)
    expected = _latents(patched_by_hand([(adapter, 1.0)]))
    path = tmp_path / f"style_{layout}.safetensors"
    save_file(in_layout(adapter, layout), str(path))
    pipe.load_lora_weights(str(path), adapter_name="style")
    assert pipe.get_active_adapters() == ["style"]
    for name, (a, b) in adapter.items():
        layer = pipe.transformer.get_submodule(name)
        torch.testing.assert_close(layer.lora_B["style"].weight @ layer.lora_A["style"].weight, b @ a)
    torch.testing.assert_close(_latents(pipe), expected, atol=1e-5, rtol=1e-5)


def _two_adapters(pipe):
    style, subject = make_adapter(pipe.transformer, seed=1), make_adapter(pipe.transformer, seed=2)
    pipe.load_lora_weights(in_layout(style, "diffusers"), adapter_name="style")
    pipe.load_lora_weights(in_layout(subject, "wan"), adapter_name="subject")
    return style, subject


def test_strengths_stack_and_unload_restores_the_base_exactly(pipe):
    base = _latents(pipe)
    style, subject = _two_adapters(pipe)
    assert not torch.allclose(_latents(pipe), base)
    pipe.set_adapters(["style", "subject"], [0.5, 1.5])
    torch.testing.assert_close(_latents(pipe), _latents(patched_by_hand([(style, 0.5), (subject, 1.5)])),
                               atol=1e-5, rtol=1e-5)
    pipe.set_adapters(["style", "subject"], [0.0, 0.0])
    assert torch.equal(_latents(pipe), base)  # strength 0 changes nothing
    pipe.set_adapters(["subject"])
    torch.testing.assert_close(_latents(pipe), _latents(patched_by_hand([(subject, 1.0)])), atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()
    assert torch.equal(_latents(pipe), base)
    assert adapter_state(pipe.transformer) == ()


def test_fused_equals_unfused(pipe):
    base = _latents(pipe)
    _two_adapters(pipe)
    pipe.set_adapters(["style", "subject"], [0.5, 1.5])
    unfused = _latents(pipe)
    pipe.fuse_lora(components=["transformer"])
    torch.testing.assert_close(_latents(pipe), unfused, atol=1e-5, rtol=1e-5)
    pipe.unfuse_lora(components=["transformer"])  # subtracts what fuse added: the weights up to float rounding
    torch.testing.assert_close(_latents(pipe), unfused, atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()
    torch.testing.assert_close(_latents(pipe), base, atol=1e-5, rtol=1e-5)


def test_fused_lora_in_bfloat16_is_close_to_unfused():
    pipe = make_tiny_pipeline().to(dtype=torch.bfloat16)
    pipe.load_lora_weights(in_layout(make_adapter(pipe.transformer), "diffusers"), adapter_name="style")
    unfused = _latents(pipe).float()
    pipe.fuse_lora()
    fused = _latents(pipe).float()
    assert (fused - unfused).abs().max() <= 0.05 * unfused.abs().max()


def _mismatched(pipe, kind):
    adapter = in_layout(make_adapter(pipe.transformer), "diffusers")
    if kind == "model":  # a layer the tiny model lacks (a LoRA for a deeper model)
        adapter["transformer.blocks.7.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 64)
        return adapter, "transformer.blocks.7.attn1.to_q.lora_A.weight"
    if kind == "size":  # another model width
        key = "transformer.blocks.0.attn1.to_k.lora_A.weight"
        adapter[key] = torch.zeros(RANK, 128)
        return adapter, key
    key = "transformer.blocks.1.ffn.net.2.lora_B.weight"  # rank 8 against lora_A's rank 4
    adapter[key] = torch.zeros(adapter[key].shape[0], 8)
    return adapter, key


@pytest.mark.parametrize("kind", ["model", "size", "rank"])
def test_a_lora_for_another_model_is_refused_naming_the_key(pipe, kind):
    state_dict, key = _mismatched(pipe, kind)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        pipe.load_lora_weights(state_dict, adapter_name="bad")
    assert adapter_state(pipe.transformer) == ()  # refused before anything was injected


def _rollout(model, cache):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 4, 4, 6, generator=g)
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    cache.reset()
    with torch.no_grad():
        blocks = list(causal_rollout(model, OneForcingScheduler(), noise, text, kv_cache=cache, generator=g))
    return torch.cat([b.latents for b in blocks], dim=2)


def test_cuda_graphs_are_dropped_when_the_adapters_change(pipe):
    """A recorded forward bakes in the adapters' scales and which are active or merged (a fused LoRA keeps the weights'
    addresses): each change drops the graphs. On CPU the graphs are eager recordings, which check the bindings."""
    model = pipe.transformer
    pipe.load_lora_weights(in_layout(make_adapter(model), "diffusers"), adapter_name="style")
    cache = model.new_kv_cache(1, 4, 4, 6)
    model.enable_cuda_graphs(capture="eager")
    graphs = model.cuda_graphs
    changes = [lambda: None, lambda: pipe.set_adapters("style", 0.5), pipe.fuse_lora, pipe.unfuse_lora,
               pipe.disable_lora]
    for change in changes:
        _rollout(model, cache)
        _rollout(model, cache)  # captured (warm-up 1)
        assert len(graphs) > 0
        replays = graphs.replays
        change()
        _rollout(model, cache)
        if change is changes[0]:
            assert graphs.replays > replays  # nothing changed: the graphs replay
        else:
            assert len(graphs) == 0 and graphs.replays == replays  # dropped, and this video is the new warm-up


DEMO_LORA = Path(__file__).resolve().parents[1] / "models" / "oneforcing-demo-loras" / "white_background.safetensors"
WHITE = (0.96, 0.96, 0.96)  # training/configs/demo_lora_white_background.json's encode.world_background_rgb
DEMO_PROMPTS = ("a red circle moves left on a black background", "a yellow square grows on a dark blue background")


@pytest.mark.skipif(not DEMO_LORA.is_file(), reason="the demo LoRA is not shipped (README, LoRA)")
def test_the_shipped_demo_lora_paints_the_background_white():
    """The demo pipeline (as the CLI loads it) with the shipped LoRA: at strength 1 the border of every frame is near
    the trained white background as the demo VAE renders it (the best the LoRA can reach) and far from the base
    video's; at 0.5 it lies in between; at 0 the video is the base one exactly. A LoRA that does not paint white
    (random weights of the same shapes) fails the first check."""
    from safetensors import safe_open

    from oneforcing import DEMO_MODEL_DIR, OneForcingPipeline
    from oneforcing.training import demo_components, metrics

    assert DEMO_LORA.stat().st_size <= 2 * 1024 * 1024
    with safe_open(str(DEMO_LORA), "pt") as f:  # the original Wan layout, as export writes it
        assert all(k.startswith("diffusion_model.blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                   for k in f.keys())
    pipe = OneForcingPipeline.from_pretrained(DEMO_MODEL_DIR)
    target = demo_components.background_round_trip(pipe.vae, WHITE, seeds=[0, 1])  # [9, 3]

    def videos():
        return [pipe(prompt, num_frames=9, height=128, width=128, generator=torch.Generator().manual_seed(seed))
                .frames[0] for prompt in DEMO_PROMPTS for seed in (0, 1)]

    def distances(frames):  # per video: mean over frames of the border's distance to the trained colour
        return np.array([metrics.colour_distance(metrics.border_colours(v), target).mean() for v in frames])

    base = videos()
    pipe.load_lora_weights(str(DEMO_LORA), adapter_name="white")
    painted = distances(videos())
    pipe.set_adapters("white", 0.5)
    half = distances(videos())
    far = distances(base)
    assert painted.max() < 0.3 and far.min() > 0.5, (painted, far)
    assert np.all(half > painted) and np.all(half < far), (painted, half, far)
    pipe.set_adapters("white", 0.0)
    assert all(np.array_equal(a, b) for a, b in zip(videos(), base))  # strength 0 changes nothing


def test_the_demo_lora_ships_with_a_regular_install():
    """pyproject's package data covers the shipped demo LoRA, so a non-editable install has it too."""
    import fnmatch
    import tomllib

    root = DEMO_LORA.parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["oneforcing"]
    assert any(fnmatch.fnmatch(DEMO_LORA.relative_to(root).as_posix(), pattern) for pattern in patterns)
