"""The teacher's on-the-fly world data (training/stream.py), on tiny real encoders on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_text_encoder, make_tiny_tokenizer, make_tiny_vae

from oneforcing.pipelines.pipeline_one_forcing import encode_prompt
from oneforcing.pipelines.vae_streaming import encode_video
from oneforcing.training.__main__ import main
from oneforcing.training.config import load_config
from oneforcing.training.encode import render_world_clip
from oneforcing.training.stream import STREAM_CLIPS, STREAM_FIRST_SEED, WorldLatentStream, stream_clip_numbers

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny tokenizer, text encoder and VAE saved as the encode section names them; returns (folder, components)."""
    folder = tmp_path_factory.mktemp("encoders")
    tokenizer, vae = make_tiny_tokenizer(), make_tiny_vae()
    text_encoder = make_tiny_text_encoder(len(tokenizer))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    vae.save_pretrained(str(folder / "vae"))
    return folder, (tokenizer, text_encoder, vae)


def _config_dict(folder: Path, output_dir: Path) -> dict:
    config = json.loads((CONFIGS / "tiny_cpu.json").read_text())
    config["encode"].update({name: str(folder / name) for name in ("vae", "tokenizer", "text_encoder")})
    config["encode"].update(num_frames=5, height=32, width=32, max_sequence_length=16)
    config["teacher"].update(batch_size=2, log_every=100, save_every=2)
    config.update(output_dir=str(output_dir), data={"stream": True})
    return config


def _config(folder: Path, output_dir: Path, *overrides: str):
    path = output_dir / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_config_dict(folder, output_dir)))
    return load_config(path, list(overrides)), path


def test_clip_numbers_of_steps_and_ranks_never_overlap():
    seen = set()
    for step in range(1, 6):
        for rank in range(3):
            numbers = stream_clip_numbers(step, 4, rank, 3)
            assert len(numbers) == 4 and not seen & set(numbers)
            seen |= set(numbers)
    assert seen == set(range(5 * 3 * 4))  # consecutive: no clip number skipped
    with pytest.raises(ValueError, match="from 1"):
        stream_clip_numbers(0, 4)
    with pytest.raises(ValueError, match="repeat"):
        stream_clip_numbers(STREAM_CLIPS // 4 + 1, 4)


def test_stream_seeds_lie_beyond_every_encode_stage_seed():
    # the encode stage renders world seed ``config.seed * 1e6 + i`` (32-bit seeds); the stream starts above them
    assert STREAM_FIRST_SEED > 2000 * 1_000_000 and STREAM_FIRST_SEED + STREAM_CLIPS <= 2**32


def test_a_batch_is_the_clips_of_its_step_encoded_as_the_encode_stage_does(encoders, tmp_path):
    folder, (tokenizer, text_encoder, vae) = encoders
    config, _ = _config(folder, tmp_path)
    stream = WorldLatentStream(config, "cpu", batch_size=2)
    batch = stream.batch(2)
    clips = [render_world_clip(config, STREAM_FIRST_SEED + n) for n in (2, 3)]
    videos = torch.stack([video for video, _ in clips])
    assert batch["caption"] == [caption for _, caption in clips]
    assert batch["latents"].dtype == torch.float32 and batch["latents"].shape == (2, 16, 2, 4, 4)
    torch.testing.assert_close(batch["latents"], encode_video(vae, videos).float(), atol=1e-5, rtol=1e-5)
    expected_embeds = encode_prompt(tokenizer, text_encoder, batch["caption"], 16)
    torch.testing.assert_close(batch["prompt_embeds"], expected_embeds.float())
    negative = encode_prompt(tokenizer, text_encoder, config.encode.negative_prompt, 16)[0]
    torch.testing.assert_close(stream.negative_prompt_embeds(), negative)

    following = stream.batch(3)  # the next step: new clips
    assert not torch.allclose(following["latents"], batch["latents"])
    again = stream.batch(2)  # a step's batch is the same whenever it is asked for (a resume)
    torch.testing.assert_close(again["latents"], batch["latents"])
    assert again["caption"] == batch["caption"]


def test_stream_needs_world_clips(encoders, tmp_path):
    folder, _ = encoders
    config, _ = _config(folder, tmp_path, "encode.source=videos")
    with pytest.raises(ValueError, match="encode.source is 'videos'"):
        WorldLatentStream(config, "cpu", batch_size=2)


def _loss_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "teacher" / "log.jsonl").read_text().splitlines()]


def test_teacher_trains_on_the_stream_and_a_resumed_run_sees_the_same_batches(encoders, tmp_path):
    folder, _ = encoders
    _, whole = _config(folder, tmp_path / "whole")
    summary = main(["teacher", "--config", str(whole), "teacher.steps=4"])
    assert summary["steps"] == 4 and not (tmp_path / "whole" / "latents").exists()  # no latent folder read or made

    _, split = _config(folder, tmp_path / "split")
    main(["teacher", "--config", str(split), "teacher.steps=2"])
    main(["teacher", "--config", str(split), "teacher.steps=4"])  # resumes at step 2
    uninterrupted, resumed = _loss_rows(tmp_path / "whole"), _loss_rows(tmp_path / "split")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert len({round(r["loss"], 6) for r in uninterrupted}) == 4
