"""LoRA training: every stage trains adapters instead of full weights (``lora.rank``), each stage starts from the
previous one's adapter merged, and ``export`` writes a Wan LoRA file the pipeline loads to the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_pipeline, write_random_latent_folder
from safetensors.torch import load_file

from oneforcing.training.__main__ import main
from oneforcing.training.config import load_config
from oneforcing.training.runner import load_transformer

pytest.importorskip("peft")
CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


@pytest.fixture(scope="module")
def lora_recipe(tmp_path_factory):
    """The tiny CPU recipe with ``lora.rank=4``, every stage run on a folder of 4 random latent clips."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora_recipe")
    write_random_latent_folder(root / "latents")
    config = json.loads((CONFIGS / "tiny_cpu.json").read_text())
    config.update(output_dir=str(root / "run"), data={"latents": str(root / "latents")}, lora={"rank": 4})
    config["teacher"].update(steps=3, log_every=100)
    config["ode_pairs"].update(num_pairs=2, batch_size=2, num_inference_steps=2)
    config["ode_init"].update(steps=2, log_every=100)
    config["distill"].update(steps=2, log_every=100, gan={**config["distill"]["gan"], "enabled": False})
    path = root / "recipe.json"
    path.write_text(json.dumps(config))
    for stage in ("teacher", "ode-pairs", "ode-init", "distill"):
        main([stage, "--config", str(path)])
    yield root, path
    torch.set_num_threads(threads)


def test_stages_train_only_the_adapters(lora_recipe):
    root, path = lora_recipe
    config = load_config(path)
    teacher = root / "run" / "teacher" / "final" / "transformer"
    assert json.loads((teacher / "adapter_config.json").read_text())["r"] == 4
    weights = load_file(str(teacher / "diffusion_pytorch_model.safetensors"))
    fresh = load_transformer(None, config).state_dict()  # the same seed: the teacher's starting weights
    base = {k.replace(".base_layer", ""): v for k, v in weights.items() if "lora_" not in k}
    assert all(torch.equal(v, fresh[k]) for k, v in base.items())  # frozen
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".lora_B." in k)  # trained (lora_B starts at zero)
    for stage, name in (("ode_init", "generator"), ("distill", "generator"), ("distill", "critic")):
        assert (root / "run" / stage / "final" / name / "adapter_config.json").is_file()
    assert (root / "run" / "distill" / "final" / "lora.safetensors").is_file()  # distill exports the adapter


def test_export_writes_a_wan_lora_the_pipeline_loads_to_the_trained_generator(lora_recipe):
    root, path = lora_recipe
    final = root / "run" / "distill" / "final"
    main(["export", "--config", str(path), "--source", str(final / "generator"), "--out", str(root / "style.safetensors")])
    tensors = load_file(str(root / "style.safetensors"))
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in tensors
    assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in tensors and not any("alpha" in k for k in tensors)

    config = load_config(path)
    pipe = make_tiny_pipeline()
    pipe.transformer = load_transformer(root / "run" / "ode_init" / "final" / "generator", config).eval()  # base
    trained = load_transformer(final / "generator", config).eval()  # base + adapter, merged
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(x, torch.tensor([1000.0]), text).sample
        base = pipe.transformer(x, torch.tensor([1000.0]), text).sample
        pipe.load_lora_weights(str(root / "style.safetensors"), adapter_name="style")
        got = pipe.transformer(x, torch.tensor([1000.0]), text).sample
    assert not torch.allclose(base, expected, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
