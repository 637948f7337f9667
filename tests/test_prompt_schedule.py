"""Prompt switching: the schedule's validation and rounding, the KV re-cache, and switches in rollout and pipeline."""

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_transformer

from oneforcing import OneForcingScheduler, causal_rollout
from oneforcing.pipelines.prompt_schedule import PromptSchedule, latent_frame_of_video, video_frame_of_latent
from oneforcing.pipelines.rollout import recache

H, W = 4, 6  # latent size: 6 tokens per frame with the tiny transformer
TPF = (H // 2) * (W // 2)


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(seed=5)


def _text(seed):
    return torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(seed))


def _rollout(model, frames, fpb=1, switches=None, cache=None, **kw):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, frames, H, W, generator=g)
    with torch.no_grad():
        blocks = list(causal_rollout(model, OneForcingScheduler(), noise, _text(1), frames_per_block=fpb,
                                     generator=g, kv_cache=cache, prompt_switches=switches, **kw))
    return torch.cat([b.latents for b in blocks], dim=2)


# -- the schedule ------------------------------------------------------------------------------------------------------
def test_schedule_forms_agree(tmp_path):
    parsed = PromptSchedule.parse(["0:a cat", "40:a dog on the beach"])
    switches = PromptSchedule.from_switches({40: "a dog on the beach", 0: "a cat"})
    ranges = PromptSchedule([{"start": 0, "end": 40, "prompt": "a cat"}, (40, "a dog on the beach")])
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"0": "a cat", "40": "a dog on the beach"}))
    coerced = PromptSchedule.coerce({0: "a cat", 40: "a dog on the beach"})
    for schedule in (switches, ranges, PromptSchedule.load(path), coerced):
        assert schedule.ranges == parsed.ranges
    assert parsed.prompt_at(39) == "a cat" and parsed.prompt_at(40) == "a dog on the beach"
    assert PromptSchedule.parse(["a cat: walking"]).prompts == ["a cat: walking"]  # one prompt, no frame needed


def test_video_and_latent_frames():
    # latent frame 0 = video frame 0, latent l = video frames 4l-3..4l
    assert [video_frame_of_latent(l) for l in range(4)] == [0, 1, 5, 9]
    assert [latent_frame_of_video(v) for v in (0, 1, 2, 4, 5, 6, 9)] == [0, 1, 2, 2, 2, 3, 3]


def test_switches_round_up_to_block_starts():
    schedule = PromptSchedule.parse(["0:a", "9:b", "14:c"])  # 21 video frames = 6 latent frames
    assert schedule.latent_switches(21, frames_per_block=1) == [(0, "a"), (3, "b"), (5, "c")]
    # blocks of 2 latent frames start at 0, 2, 4: 9 -> latent 3 -> block 4; 14 -> latent 5 -> block 6 = past the end
    with pytest.raises(ValueError, match="frame 14.*past the end"):
        schedule.latent_switches(21, frames_per_block=2)
    # with an image as context (1 latent frame) blocks of 2 start at 1, 3, 5
    assert schedule.latent_switches(21, frames_per_block=2, context_latent_frames=1) == [(0, "a"), (3, "b"), (5, "c")]
    with pytest.raises(ValueError, match="both land on the block"):
        PromptSchedule.parse(["0:a", "7:b", "8:c"]).latent_switches(21, frames_per_block=3)


@pytest.mark.parametrize(
    "ranges, message",
    [
        ([], "empty"),
        ([(0, "   ")], "empty"),
        ([(4, "a")], "gap: frames 0..3"),
        ([(0, 10, "a"), (12, "b")], "gap: frames 10..11"),
        ([(0, 12, "a"), (10, "b")], "overlap"),
        ([(0, "a"), (0, "b")], "overlap"),
        ([(0, 5, "a"), (5, 5, "b")], "empty"),
        ([(-1, "a")], ">= 0"),
        ([(0, 3)], "text or embeddings"),
    ],
)
def test_bad_schedules(ranges, message):
    with pytest.raises(ValueError, match=message):
        PromptSchedule(ranges)


def test_bad_schedule_lengths_and_files(tmp_path):
    with pytest.raises(ValueError, match="frame 81.*past the end"):
        PromptSchedule.parse(["0:a", "81:b"]).check_length(81)
    with pytest.raises(ValueError, match="frames 40..80 have no prompt"):
        PromptSchedule([(0, 40, "a")]).check_length(81)
    with pytest.raises(ValueError, match="no end"):
        PromptSchedule([(0, 40, "a")]).check_length(None)
    with pytest.raises(ValueError, match="needs its first frame"):
        PromptSchedule.parse(["0:a", "b"])
    bad = tmp_path / "bad.json"
    bad.write_text("{0: 'a'}")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        PromptSchedule.load(bad)
    bad.write_text('{"zero": "a"}')
    with pytest.raises(ValueError, match="bad.json.*frame numbers"):
        PromptSchedule.load(bad)


# -- the KV re-cache ---------------------------------------------------------------------------------------------------
def _commit_fresh(model, latents, text, fpb):
    """A new full cache holding ``latents`` committed block by block under ``text``."""
    cache = model.new_kv_cache(1, latents.shape[2], H, W)
    with torch.no_grad():
        for start in range(0, latents.shape[2], fpb):
            block = latents[:, :, start:start + fpb]
            model(block, torch.zeros(1, block.shape[2]), text, kv_cache=cache, start_frame=start, commit=True)
    return cache


@pytest.mark.parametrize("fpb", [1, 2])
def test_recache_recomputes_the_keys_under_the_new_prompt(model, fpb):
    cache = model.new_kv_cache(1, 4, H, W)
    latents = _rollout(model, 4, fpb=fpb, cache=cache, commit_last_block=True)
    before = [k.clone() for k in cache.key]
    new_text = _text(2)
    recache(model, cache, new_text)
    fresh = _commit_fresh(model, latents, new_text, fpb)
    assert torch.equal(cache.latents, latents)  # the clean latents were kept
    # layer 0's keys come before any cross-attention, so only the later layers' keys depend on the prompt
    assert (cache.key[1] - before[1]).abs().max() > 1e-3
    for layer in range(len(cache.key)):
        assert (cache.key[layer] - fresh.key[layer]).abs().max() < 1e-5
        assert (cache.value[layer] - fresh.value[layer]).abs().max() < 1e-5
    assert (cache.committed_frames, cache.cached_frames) == (4, 4)


@pytest.mark.parametrize("keep_sink", [False, True])
def test_recache_of_a_rolling_cache_and_the_kept_sink(model, keep_sink):
    cache = model.new_kv_cache(1, 1, H, W, window_frames=3, sink_frames=2, relative_positions=True)
    latents = _rollout(model, 8, cache=cache, commit_last_block=True)
    assert cache.evicted_frames == 3
    before = [k.clone() for k in cache.key]
    new_text = _text(2)
    recache(model, cache, new_text, keep_sink=keep_sink)
    # relative positions: the cache equals the sink frames and the window frames committed afresh one after another
    window = torch.cat([latents[:, :, :2], latents[:, :, 5:]], dim=2)
    fresh = _commit_fresh(model, window, new_text, 1)
    sink = slice(0, 2 * TPF)
    rest = slice(2 * TPF, 5 * TPF)
    for layer in range(len(cache.key)):
        if keep_sink:
            assert torch.equal(cache.key[layer][:, sink], before[layer][:, sink])
        else:
            assert (cache.key[layer][:, sink] - fresh.key[layer][:, sink]).abs().max() < 1e-5
        if layer > 0:
            assert (cache.key[layer][:, rest] - before[layer][:, rest]).abs().max() > 1e-3
    if not keep_sink:
        assert all((c - f).abs().max() < 1e-5 for c, f in zip(cache.key, fresh.key))
    assert (cache.committed_frames, cache.cached_frames, cache.evicted_frames) == (8, 5, 3)


def test_recache_needs_the_clean_latents(model):
    cache = model.new_kv_cache(1, 2, H, W)
    with torch.no_grad():
        model(torch.randn(1, 16, 1, H, W), torch.zeros(1, 1), _text(1), kv_cache=cache, commit=True)
    with pytest.raises(ValueError, match="clean latents"):
        recache(model, cache, _text(2))


# -- switches in the rollout and the pipeline --------------------------------------------------------------------------
@pytest.mark.parametrize("fpb", [1, 2])
def test_switch_leaves_earlier_frames_bit_identical(model, fpb):
    plain = _rollout(model, 6, fpb=fpb)
    switched = _rollout(model, 6, fpb=fpb, switches={4: _text(2)})
    assert torch.equal(switched[:, :, :4], plain[:, :, :4])
    assert (switched[:, :, 4:] - plain[:, :, 4:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4
    with pytest.raises(ValueError, match="not a block start"):
        _rollout(model, 6, fpb=2, switches={3: _text(2)})
    with pytest.raises(ValueError, match="past the end"):
        _rollout(model, 6, fpb=fpb, switches={6: _text(2)})


def test_keep_sink_changes_what_follows(model):
    def run(keep):
        cache = model.new_kv_cache(1, 1, H, W, window_frames=3, sink_frames=2)
        return _rollout(model, 8, cache=cache, switches={6: _text(2)}, keep_sink_on_switch=keep)

    kept, recomputed = run(True), run(False)
    assert torch.equal(kept[:, :, :6], recomputed[:, :, :6])
    assert (kept[:, :, 6:] - recomputed[:, :, 6:]).abs().max() > 1e-5


def test_pipeline_prompt_schedule():
    pipe = make_tiny_pipeline(seed=2)
    args = dict(num_frames=13, height=32, width=32, max_sequence_length=16)

    def run(**kw):
        return pipe(**args, **kw, generator=torch.Generator().manual_seed(0)).frames

    plain = run(prompt="a corgi surfing")
    switched = run(prompt_schedule={0: "a corgi surfing", 9: "a red circle moves left"})  # latent frame 3
    assert switched.shape == plain.shape == (1, 13, 32, 32, 3)
    assert np.array_equal(switched[:, :9], plain[:, :9])  # video frames of latent frames 0..2
    assert np.abs(switched[:, 9:] - plain[:, 9:]).max() > 1e-3
    assert np.array_equal(run(prompt_schedule=PromptSchedule.parse(["0:a corgi surfing", "9:a red circle moves left"])),
                          switched)
    with pytest.raises(ValueError, match="past the end"):
        run(prompt_schedule={0: "a cat", 13: "a dog"})
    with pytest.raises(ValueError, match="exactly one of prompt"):
        run(prompt="a cat", prompt_schedule={0: "a dog"})
