"""Rolling KV cache with sink frames: constant memory, sink kept, relative positions, equality with the full cache."""

import pytest
import torch
from conftest import make_tiny_transformer

from oneforcing import OneForcingScheduler, causal_rollout


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(seed=11)


def _rollout(model, frames, cache=None, fpb=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, frames, 4, 6, generator=g)
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        blocks = list(causal_rollout(model, OneForcingScheduler(), noise, text, frames_per_block=fpb, kv_cache=cache,
                                     generator=g))
    return torch.cat([b.latents for b in blocks], dim=2)


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("fpb", [1, 3])
def test_window_as_long_as_the_video_equals_the_full_cache(model, relative, fpb):
    full = _rollout(model, 6, fpb=fpb)
    cache = model.new_kv_cache(1, 6, 4, 6, window_frames=4, sink_frames=2, relative_positions=relative)
    assert torch.equal(_rollout(model, 6, cache, fpb=fpb), full)
    assert cache.evicted_frames == 0


def test_eviction_changes_later_frames_only(model):
    full = _rollout(model, 8)
    cache = model.new_kv_cache(1, 8, 4, 6, window_frames=3, sink_frames=1)
    rolled = _rollout(model, 8, cache)
    # the window counts the block being made: frames 0..3 fit in 4 slots and saw the whole past
    assert torch.equal(rolled[:, :, :4], full[:, :, :4])
    assert (rolled[:, :, 4:] - full[:, :, 4:]).abs().max() > 1e-4
    assert cache.cached_frames == 3 and cache.evicted_frames == 4  # the last block is not committed


def test_sink_is_never_evicted_and_memory_is_constant(model):
    cache = model.new_kv_cache(1, 1, 4, 6, window_frames=2, sink_frames=2, relative_positions=True)
    text = torch.randn(1, 16, 32)
    x = torch.randn(1, 16, 1, 4, 6)
    t = torch.zeros(1, 1)
    memory, sink_keys = [], None
    with torch.no_grad():
        for frame in range(200):
            model(x + frame * 0.01, t, text, kv_cache=cache, start_frame=frame, commit=True)
            if frame == 1:
                sink_keys = cache.key[0][:, : 2 * 6].clone()
            if frame in (10, 199):
                memory.append(cache.memory_bytes())
    assert memory[0] == memory[1]
    assert torch.equal(cache.key[0][:, : 2 * 6], sink_keys)
    assert cache.committed_frames == 200 and cache.cached_frames == 4


def test_relative_positions_go_past_the_rotary_table():
    model = make_tiny_transformer(seed=11, rope_max_seq_len=8)  # Wan's table has 1024 positions; 8 keeps this fast
    absolute = model.new_kv_cache(1, 1, 4, 6, window_frames=2)
    relative = model.new_kv_cache(1, 1, 4, 6, window_frames=2, relative_positions=True)
    x, t, text = torch.randn(1, 16, 1, 4, 6), torch.zeros(1, 1), torch.randn(1, 16, 32)
    with torch.no_grad():
        for frame in range(20):
            model(x, t, text, kv_cache=relative, start_frame=frame, commit=True)
        with pytest.raises(ValueError, match="rotary table"):
            for frame in range(20):
                model(x, t, text, kv_cache=absolute, start_frame=frame, commit=True)


def test_relative_eviction_equals_recomputing_the_window(model):
    """After eviction, the moved keys equal keys computed afresh at their new (slot) positions."""
    text = torch.randn(1, 16, 32)
    frames = torch.randn(1, 16, 5, 4, 6)
    t = torch.zeros(1, 1)
    rolled = model.new_kv_cache(1, 1, 4, 6, window_frames=3, relative_positions=True)
    with torch.no_grad():
        for f in range(4):
            model(frames[:, :, f:f + 1], t, text, kv_cache=rolled, start_frame=f, commit=True)
        # frame 0 is evicted; frames 1..3 now sit at slots 0..2, as if the video had started at frame 1
        fresh = model.new_kv_cache(1, 3, 4, 6)
        for f in range(1, 4):
            model(frames[:, :, f:f + 1], t, text, kv_cache=fresh, start_frame=f - 1, commit=True)
    assert (rolled.key[0][:, 6:] - fresh.key[0][:, 6:]).abs().max() < 1e-5  # frames 2, 3 (same context in layer 0)
    assert (rolled.key[0][:, :6] - fresh.key[0][:, :6]).abs().max() < 1e-5


def test_bad_rolling_settings(model):
    with pytest.raises(ValueError, match="rolling"):
        model.new_kv_cache(1, 4, 4, 6, sink_frames=2)
    cache = model.new_kv_cache(1, 1, 4, 6, window_frames=2)
    with pytest.raises(ValueError, match="does not fit a window"):
        model(torch.randn(1, 16, 3, 4, 6), torch.zeros(1, 3), torch.randn(1, 16, 32), kv_cache=cache)
