"""The training stages as commands, end to end on CPU with tiny models: outputs, resume, export, encoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRANSFORMER, make_tiny_pipeline, make_tiny_text_encoder, make_tiny_tokenizer, make_tiny_vae
from safetensors.torch import load_file

from oneforcing import CausalWanTransformer3DModel
from oneforcing.training.__main__ import main
from oneforcing.training.data import LatentFolder, OdePairFolder, write_latent_sample, write_negative_prompt
from oneforcing.training.discriminator import RegisterDiscriminator

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models are latency-bound: one thread is faster, and far faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_row(row: dict, expected: dict) -> None:
    """Two loss-log rows agree: text fields exactly, numbers to float tolerance, the wall clock ignored."""
    assert row.keys() == expected.keys()
    for key, value in row.items():
        if key == "seconds":
            continue
        if isinstance(value, str):
            assert value == expected[key], (row["step"], key)
        else:
            assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (row["step"], key)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A latent folder of 6 smooth random clips and a config running every stage for a few steps."""
    root = tmp_path_factory.mktemp("recipe")
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        coarse = torch.randn(16, 3, 2, 2, generator=g)
        latents = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
        write_latent_sample(root / "latents" / f"sample_{i:06d}.safetensors", latents,
                            torch.randn(8, 32, generator=g), f"clip {i}")
    write_negative_prompt(root / "latents", torch.zeros(8, 32))
    config = json.loads((CONFIGS / "tiny_cpu.json").read_text())
    config.update(output_dir=str(root / "run"), data={"latents": str(root / "latents")})
    config["teacher"].update(steps=6, log_every=100)
    config["ode_pairs"].update(num_pairs=4, batch_size=2, num_inference_steps=4)
    config["ode_init"].update(steps=4, log_every=100)
    config["distill"].update(steps=6, save_every=3, log_every=100)
    # the head at a rate of its own, and reading clips at noise levels of its own (a three-video critic pass)
    config["distill"].setdefault("gan", {}).update(lr=3 * config["distill"]["lr_critic"], timestep_shift=1.0)
    path = root / "recipe.json"
    path.write_text(json.dumps(config))
    for stage in ("teacher", "ode-pairs", "ode-init", "distill"):
        main([stage, "--config", str(path)])
    return root, path


def test_every_stage_writes_loadable_outputs(recipe):
    root, path = recipe
    run = root / "run"
    teacher = CausalWanTransformer3DModel.from_pretrained(str(run / "teacher" / "final" / "transformer"))
    assert teacher.config.num_layers == TINY_TRANSFORMER["num_layers"]
    rows = _rows(run / "teacher" / "log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["loss"] > 0 for r in rows)

    pairs = OdePairFolder(run / "ode_pairs")
    assert len(pairs) == 4 and pairs.timesteps == [1000.0]
    assert pairs.shapes["states"] == (2, 16, 3, 8, 8)

    final = run / "distill" / "final"
    for name in ("generator", "generator_ema", "critic"):
        CausalWanTransformer3DModel.from_pretrained(str(final / name))
    head = RegisterDiscriminator.from_pretrained(str(final / "discriminator"))
    assert head.feature_layers == (0, 1)
    rows = _rows(run / "distill" / "log.jsonl")
    generator_rows = [r["step"] for r in rows if "dmd" in r]
    assert generator_rows == [1, 6]  # 5 critic steps per generator step
    assert all({"critic_flow", "d_adv", "r1", "r2"} <= set(r) for r in rows)
    summary = json.loads((run / "distill" / "summary.json").read_text())
    assert summary["gan"] and "g_adv" in summary["last"]
    # the head trains as a parameter group of its own at distill.gan.lr, which the checkpoint keeps for a resume
    state = torch.load(run / "distill" / "checkpoints" / "step_0000003" / "state.pt", weights_only=True)
    distill = json.loads(path.read_text())["distill"]
    groups = state["optimizers"]["critic"]["param_groups"]
    assert [g["lr"] for g in groups] == [distill["lr_critic"], distill["gan"]["lr"]]

    # the reference export holds the EMA weights under Wan2.1 names and loads back as the same model
    exported = CausalWanTransformer3DModel.from_single_file(final / "one_forcing.pt")  # heads read from the file
    ema = load_file(str(final / "generator_ema" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported.state_dict()[k].float(), v) for k, v in ema.items())
    raw = torch.load(final / "one_forcing.pt", weights_only=True)
    assert list(raw) == ["generator_ema", "config"] and "model.blocks.0.self_attn.q.weight" in raw["generator_ema"]
    assert raw["config"]["num_attention_heads"] == TINY_TRANSFORMER["num_attention_heads"]

    # the distilled generator drops into the inference pipeline
    pipe = make_tiny_pipeline()
    pipe.transformer = exported
    video = pipe(prompt_embeds=torch.randn(1, 8, 32), num_frames=9, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 16, 3, 8, 8) and torch.isfinite(video).all()


def test_distill_time_budget_stops_saves_and_a_rerun_finishes_the_plan(recipe):
    root, path = recipe
    uninterrupted = {r["step"]: r for r in _rows(root / "run" / "distill" / "log.jsonl")}
    out = root / "budget"
    inputs = [f"output_dir={out}", f"distill.generator={root / 'run' / 'ode_init' / 'final' / 'generator'}",
              f"distill.teacher={root / 'run' / 'teacher' / 'final' / 'transformer'}", "distill.save_every=0"]
    summary = main(["distill", "--config", str(path), *inputs, "distill.max_seconds=1e-9"])
    assert summary["steps"] == 1 and summary["planned_steps"] == 6
    stage = out / "distill"
    assert (stage / "final" / "generator_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step_0000001"]
    summary = main(["distill", "--config", str(path), *inputs])  # resumes from step 1, no limit
    assert summary["steps"] == 6
    rows = _rows(stage / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        _assert_same_row(row, uninterrupted[row["step"]])


def test_distill_resume_repeats_the_uninterrupted_run(recipe):
    root, path = recipe
    stage = root / "run" / "distill"
    uninterrupted = {r["step"]: r for r in _rows(stage / "log.jsonl")}
    weights = load_file(str(stage / "final" / "generator" / "diffusion_pytorch_model.safetensors"))
    checkpoints = stage / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000003", "step_0000006"]
    shutil.rmtree(checkpoints / "step_0000006")
    (stage / "log.jsonl").unlink()
    main(["distill", "--config", str(path)])  # resumes from step 3 automatically
    resumed = _rows(stage / "log.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for row in resumed:
        _assert_same_row(row, uninterrupted[row["step"]])
    again = load_file(str(stage / "final" / "generator" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(again[k], v, atol=1e-7) for k, v in weights.items())


def test_distill_without_gan_and_export_command(recipe, capsys):
    root, path = recipe
    run = root / "run"
    out = root / "nogan"
    main(["distill", "--config", str(path), "--no-gan", f"output_dir={out}", "distill.steps=2",
          f"distill.generator={run / 'ode_init' / 'final' / 'generator'}",
          f"distill.teacher={run / 'teacher' / 'final' / 'transformer'}"])
    final = out / "distill" / "final"
    assert not (final / "discriminator").exists()
    rows = _rows(out / "distill" / "log.jsonl")
    assert "dmd" in rows[0] and not any("d_adv" in r or "g_adv" in r for r in rows)
    target = root / "exported.pt"
    main(["export", "--config", str(path), "--source", str(final / "generator"), "--out", str(target)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"exported": str(target)}
    exported = CausalWanTransformer3DModel.from_single_file(target)
    generator = CausalWanTransformer3DModel.from_pretrained(str(final / "generator"))
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), generator.state_dict().values()))


def test_stage_errors_name_the_missing_input(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "cpu": True,
                                  "model": {"architecture": dict(TINY_TRANSFORMER)}}))
    with pytest.raises(ValueError, match="latent folder .*latents.* does not exist"):
        main(["teacher", "--config", str(config)])
    with pytest.raises(SystemExit, match="unknown field"):
        main(["teacher", "--config", str(config), "teacher.learning_rate=1"])


def _save_tiny_encoders(folder: Path):
    """Tiny tokenizer, text encoder and VAE saved under ``folder``; returns the VAE."""
    tokenizer, vae = make_tiny_tokenizer(), make_tiny_vae()
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    make_tiny_text_encoder(len(tokenizer)).save_pretrained(str(folder / "text_encoder"))
    vae.save_pretrained(str(folder / "vae"))
    return vae


def _encoder_paths(folder: Path) -> dict:
    return {name: str(folder / name) for name in ("vae", "tokenizer", "text_encoder")}


def test_encode_world_clips_into_a_latent_folder(tmp_path):
    from oneforcing.pipelines.vae_streaming import encode_video
    from oneforcing.training import world

    vae = _save_tiny_encoders(tmp_path)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "run"), "cpu": True,
        "encode": {"source": "world", **_encoder_paths(tmp_path), "num_samples": 3, "num_frames": 5,
                   "height": 32, "width": 32, "max_sequence_length": 16, "batch_size": 2},
    }))
    main(["encode", "--config", str(config)])
    data = LatentFolder(tmp_path / "run" / "latents")
    assert len(data) == 3 and data.shapes == {"latents": (16, 2, 4, 4), "prompt_embeds": (16, 32)}
    assert data.negative_prompt_embeds().shape == (16, 32)
    item = data[1]
    video, caption, _ = world.render_clip(1, "train", 5, 32, 32, 0.3, 0.3)
    assert item["caption"] == caption
    assert torch.allclose(item["latents"], encode_video(vae, video[None])[0], atol=1e-5)


def test_encode_a_folder_of_captioned_videos(tmp_path):
    """encode.source=videos: each mp4 with its .txt caption, cover-scaled and centre-cropped, first num_frames frames."""
    import numpy as np

    from oneforcing.pipelines.video_io import export_to_mp4

    _save_tiny_encoders(tmp_path)
    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    for name, caption, frames in (("a", "a red square", 7), ("b", "a blue circle", 5)):
        clip = rng.random((frames, 24, 40, 3))  # wider than tall: cropped at the sides
        export_to_mp4(clip, videos / f"{name}.mp4")
        (videos / f"{name}.txt").write_text(caption + "\n")
    config = tmp_path / "c.json"
    encode = {"source": "videos", "videos_dir": str(videos), **_encoder_paths(tmp_path), "num_samples": 0,
              "num_frames": 5, "height": 32, "width": 32, "max_sequence_length": 16, "batch_size": 2}
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "cpu": True, "encode": encode}))
    main(["encode", "--config", str(config)])
    data = LatentFolder(tmp_path / "run" / "latents")
    assert len(data) == 2 and data.shapes["latents"] == (16, 2, 4, 4)
    assert sorted(data[i]["caption"] for i in range(2)) == ["a blue circle", "a red square"]
    (videos / "b.txt").unlink()
    with pytest.raises(FileNotFoundError, match="has no caption file b.txt"):
        main(["encode", "--config", str(config)])
    encode.update(num_frames=9)
    (videos / "b.txt").write_text("a blue circle")
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run2"), "cpu": True, "encode": encode}))
    with pytest.raises(ValueError, match="readable frames, encode.num_frames needs 9"):
        main(["encode", "--config", str(config)])


def test_distill_under_ddp_on_two_cpu_processes(recipe):
    """The same command under torch.distributed (2 processes, gloo): gradients are all-reduced through DDP with
    several forwards per backward, and the replicas end identical."""
    import os
    import subprocess
    import sys

    root, path = recipe
    run = root / "run"
    out = root / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "oneforcing.training", "distill", "--config", str(path), f"output_dir={out}", "distill.steps=2",
        f"data.latents={root / 'latents'}", f"distill.generator={run / 'ode_init' / 'final' / 'generator'}",
        f"distill.teacher={run / 'teacher' / 'final' / 'transformer'}", "--resume", "never",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert "generator, critic, discriminator: identical on all 2 ranks" in result.stdout
    rows = _rows(out / "distill" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "dmd" in rows[0]
