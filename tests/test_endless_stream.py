"""Streaming without an end: a rolling cache keeps memory flat, the caller stops the stream, settings are checked."""

import itertools

import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_transformer

from oneforcing import OneForcingScheduler, causal_rollout

ARGS = dict(height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    pipe = make_tiny_pipeline(seed=6)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stream(pipe, **kw):
    return pipe.stream("a red circle moves left", num_frames=None, generator=torch.Generator().manual_seed(0),
                       **ARGS, **kw)


def test_endless_stream_has_flat_memory_and_stops_when_the_caller_stops(pipe):
    stream = pipe.stream("a red circle moves left", num_frames=None, height=16, width=16, max_sequence_length=8,
                         window_frames=3, sink_frames=1, output_type="latent")
    memory, positions = [], []
    for index, latents in enumerate(itertools.islice(stream, 40)):
        assert latents.shape == (1, 16, 1, 2, 2)
        cache = pipe.kv_cache  # the run's cache, while it runs
        memory.append(cache.memory_bytes())
        positions.append(cache.committed_frames)
    stream.close()
    assert pipe.kv_cache is None  # released when the caller stops
    assert len(set(memory[4:])) == 1  # constant once the window is full
    assert pipe.latents is None  # an endless run keeps no video
    assert cache.rolling and cache.relative_positions and cache.capacity == 4
    # a full window cannot fuse the clean pass into the next block: each block is committed before it is yielded
    assert positions[-1] == 40 and cache.evicted_frames == 36 and cache.cached_frames == 4
    with pytest.raises(StopIteration):
        next(stream)


def test_endless_decoded_frames_continue_the_finite_video(pipe):
    """The first blocks of an endless stream are those of a finite video with the same rolling cache."""
    endless = list(itertools.islice(_stream(pipe, window_frames=2, sink_frames=1), 4))
    assert [c.shape[1] for c in endless] == [1, 4, 4, 4]
    g = torch.Generator().manual_seed(0)  # an endless stream draws each block's noise when the block starts
    noise = torch.cat([torch.randn(1, 16, 1, 4, 4, generator=g) for _ in range(4)], dim=2)
    finite = list(pipe.stream("a red circle moves left", num_frames=13, latents=noise, window_frames=2,
                              sink_frames=1, relative_positions=True, **ARGS))
    assert np.array_equal(np.concatenate(endless, axis=1), np.concatenate(finite, axis=1))


def test_endless_defaults_and_prompt_switch(pipe):
    stream = _stream(pipe, output_type="latent")
    next(stream)
    cache = pipe.kv_cache
    assert (cache.sink_frames, cache.window_frames, cache.relative_positions) == (3, 12, True)
    stream.close()
    plain = torch.cat(list(itertools.islice(_stream(pipe, window_frames=2, sink_frames=1, output_type="latent"), 6)),
                      dim=2)
    switched = pipe.stream(prompt_schedule={0: "a red circle moves left", 13: "a cat"}, num_frames=None,
                           generator=torch.Generator().manual_seed(0), window_frames=2, sink_frames=1,
                           output_type="latent", **ARGS)
    switched = torch.cat(list(itertools.islice(switched, 6)), dim=2)
    assert torch.equal(switched[:, :, :4], plain[:, :, :4])  # video frame 13 = latent frame 4
    assert (switched[:, :, 4:] - plain[:, :, 4:]).abs().max() > 1e-4


def test_endless_needs_a_rolling_cache_and_stream():
    model = make_tiny_transformer()
    text = torch.randn(1, 16, 32)
    full = model.new_kv_cache(1, 8, 4, 4)
    with pytest.raises(ValueError, match="endless rollout .* needs a rolling KV cache"):
        next(causal_rollout(model, OneForcingScheduler(), lambda start, n: torch.randn(1, 16, n, 4, 4), text,
                            kv_cache=full, num_frames=None))
    with pytest.raises(ValueError, match="needs a kv_cache"):
        next(causal_rollout(model, OneForcingScheduler(), lambda start, n: torch.randn(1, 16, n, 4, 4), text))
    rolling = model.new_kv_cache(1, 1, 4, 4, window_frames=2)
    with pytest.raises(ValueError, match="must return \\[1, C, 1, H, W\\]"):
        next(causal_rollout(model, OneForcingScheduler(), lambda start, n: torch.randn(1, 16, 4, 4), text,
                            kv_cache=rolling, num_frames=None))


def test_bad_endless_arguments(pipe):
    with pytest.raises(ValueError, match="cannot be given for an endless stream"):
        next(_stream(pipe, latents=torch.zeros(1, 16, 1, 4, 4)))
    with pytest.raises(ValueError, match="must hold a whole block"):
        next(pipe.stream("a cat", num_frames=None, frames_per_block=3, window_frames=2, **ARGS))
    with pytest.raises(ValueError, match="need a rolling cache"):
        next(pipe.stream("a cat", num_frames=9, sink_frames=2, **ARGS))
    with pytest.raises(ValueError, match="no end"):
        next(pipe.stream(prompt_schedule=[(0, 8, "a cat")], num_frames=None, **ARGS))


def test_new_session_is_the_session_stream_drives(pipe):
    """A caller driving ``new_session`` and ``streaming_decoder`` itself gets the frames of ``stream``."""
    from oneforcing.pipelines.pipeline_one_forcing import GenerationRequest

    expected = list(itertools.islice(_stream(pipe), 3))
    request = GenerationRequest(prompt="a red circle moves left", num_frames=None,
                                generator=torch.Generator().manual_seed(0), **ARGS)
    session, decoder = pipe.new_session(request), pipe.streaming_decoder()
    for frames in expected:
        video = decoder.decode_block(session.next_block().latents.to(pipe.decode_dtype))
        assert np.array_equal(pipe.video_processor.postprocess_video(video.float(), output_type="np"), frames)
    assert session.kv_cache.rolling and session.layout.endless
