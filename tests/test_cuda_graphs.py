"""CUDA graphs of the cached forwards: the same video as eager forwards, graphs keyed and dropped correctly.

On CPU the graphs are "eager captures" (a replay re-runs the recorded call on the graph's own input tensors), which
checks everything but the CUDA capture itself: keys, input/output copies, the host bookkeeping, the bindings. The
GPU test captures real graphs.
"""

import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_transformer

from oneforcing import OneForcingScheduler, causal_rollout

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _video(model, cache, seed, fpb=1, first=None, text_seed=1, frames=5, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(1, 16, frames, 4, 6, generator=g, device=device)
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(text_seed)).to(device)
    cache.reset()
    with torch.no_grad():
        blocks = list(causal_rollout(model, OneForcingScheduler(), noise, text, frames_per_block=fpb, kv_cache=cache,
                                     generator=g, first_block_timesteps=first))
    return torch.cat([b.latents for b in blocks], dim=2)


@pytest.mark.parametrize("fpb,first", [(1, None), (3, None), (1, [1000, 750, 500, 250])])
def test_graphed_rollouts_equal_eager_ones(fpb, first):
    model = make_tiny_transformer(seed=3)
    cache = model.new_kv_cache(1, 5, 4, 6)
    expected = [_video(model, cache, seed, fpb, first) for seed in range(3)]
    model.enable_cuda_graphs(capture="eager")
    graphs = model.cuda_graphs
    got = [_video(model, cache, seed, fpb, first) for seed in range(3)]  # new noise each time: inputs are copied in
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    blocks = -(-5 // fpb)
    # each block is one fused forward (the first block's first forward computes the prompt's cross-attention)
    assert graphs.captures == len(graphs) > 0
    assert graphs.replays >= 2 * (blocks - 1)


def test_a_new_prompt_keeps_the_graphs_and_the_cache_addresses():
    model = make_tiny_transformer(seed=3)
    cache = model.new_kv_cache(1, 5, 4, 6)
    expected = _video(model, cache, 7, text_seed=2)
    model.enable_cuda_graphs(capture="eager")
    for seed in range(2):
        _video(model, cache, seed)
    addresses, graphs = cache.buffer_addresses(), len(model.cuda_graphs)
    assert torch.equal(_video(model, cache, 7, text_seed=2), expected)
    assert cache.buffer_addresses() == addresses and len(model.cuda_graphs) == graphs


def test_another_cache_or_moved_weights_drop_the_graphs():
    model = make_tiny_transformer(seed=3)
    model.enable_cuda_graphs(capture="eager")
    graphs = model.cuda_graphs
    cache = model.new_kv_cache(1, 5, 4, 6)
    for seed in range(2):
        _video(model, cache, seed)
    assert len(graphs) > 0
    expected_other = _video(make_tiny_transformer(seed=3), model.new_kv_cache(1, 5, 4, 6), 5)
    assert torch.equal(_video(model, model.new_kv_cache(1, 5, 4, 6), 5), expected_other)
    assert len(graphs) == 0  # a new cache: new addresses

    for seed in range(2):
        _video(model, cache, seed)
    assert len(graphs) > 0
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone() * 1.01  # new storage, new values
    reference = make_tiny_transformer(seed=3)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1.01)
    expected = _video(reference, reference.new_kv_cache(1, 5, 4, 6), 4)
    assert torch.allclose(_video(model, cache, 4), expected, atol=1e-6)
    assert len(graphs) == 0  # new parameter addresses: every position starts over with its warm-up


def test_graphs_do_not_keep_a_dropped_cache_alive():
    import gc
    import weakref

    model = make_tiny_transformer(seed=3)
    model.enable_cuda_graphs(capture="eager")
    cache = model.new_kv_cache(1, 5, 4, 6)
    for seed in range(2):
        _video(model, cache, seed)
    assert len(model.cuda_graphs) > 0
    dropped = weakref.ref(cache)
    del cache
    gc.collect()
    assert dropped() is None


def test_rolling_cache_rollouts_equal_eager_ones():
    model = make_tiny_transformer(seed=4)
    cache = model.new_kv_cache(1, 1, 4, 6, window_frames=3, sink_frames=1, relative_positions=True)
    expected = [_video(model, cache, seed, frames=8) for seed in range(3)]
    model.enable_cuda_graphs(capture="eager")
    got = [_video(model, cache, seed, frames=8) for seed in range(3)]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert model.cuda_graphs.replays > 0


def test_training_and_hidden_state_forwards_are_never_graphed():
    model = make_tiny_transformer(seed=3)
    model.enable_cuda_graphs(capture="eager", warmup=0)
    cache = model.new_kv_cache(1, 2, 4, 6)
    x = torch.randn(1, 16, 1, 4, 6)
    text = torch.randn(1, 16, 32)
    t = torch.full((1, 1), 1000.0)
    with torch.no_grad():
        model(x, t, text, kv_cache=cache, start_frame=0)  # computes the prompt's cross-attention: eager
        model(x, t, text, kv_cache=cache, start_frame=0, hidden_states_at=[0])
        model(x, t, text, attention_mode="bidirectional")
    model(x, t, text, kv_cache=cache, start_frame=0)  # records autograd
    assert model.cuda_graphs.captures == 0
    with torch.no_grad():
        model(x, t, text, kv_cache=cache, start_frame=0)
    assert model.cuda_graphs.captures == 1


def test_pipeline_keeps_its_cache_while_graphs_are_on():
    pipe = make_tiny_pipeline(seed=2)
    kwargs = dict(prompt="a corgi surfing", num_frames=9, height=32, width=48, output_type="latent")
    expected = [pipe(**kwargs, generator=torch.Generator().manual_seed(s)).frames for s in range(3)]
    assert pipe._kept_kv_cache is None
    pipe.transformer.enable_cuda_graphs(capture="eager")
    got = [pipe(**kwargs, generator=torch.Generator().manual_seed(s)).frames for s in range(3)]
    kept = pipe._kept_kv_cache[1]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert pipe.transformer.cuda_graphs.replays > 0
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert pipe._kept_kv_cache[1] is kept  # same geometry: reused
    pipe(**{**kwargs, "num_frames": 13}, generator=torch.Generator().manual_seed(0))
    assert pipe._kept_kv_cache[1] is not kept  # another size: a new cache
    pipe.disable_cuda_graphs()
    assert pipe._kept_kv_cache is None and pipe.transformer.cuda_graphs is None


def test_bad_settings_are_clear_errors():
    model = make_tiny_transformer()
    with pytest.raises(ValueError, match="capture"):
        model.enable_cuda_graphs(capture="sometimes")
    with pytest.raises(ValueError, match="warmup"):
        model.enable_cuda_graphs(warmup=-1)


@needs_cuda
@pytest.mark.parametrize("fpb,first", [(1, None), (3, None), (1, [1000, 750, 500, 250])])
def test_cuda_graph_rollouts_equal_eager_ones_on_the_gpu(fpb, first):
    model = make_tiny_transformer(seed=3).to("cuda")
    cache = model.new_kv_cache(1, 5, 4, 6)
    expected = [_video(model, cache, seed, fpb, first, device="cuda") for seed in range(3)]
    model.enable_cuda_graphs()
    got = [_video(model, cache, seed, fpb, first, device="cuda") for seed in range(3)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert model.cuda_graphs.captures > 0 and model.cuda_graphs.replays > 0


@needs_cuda
def test_pipeline_with_cuda_graphs_on_the_gpu():
    """Graphs, the kept KV cache and the side-stream decode together: the same videos as without graphs."""
    pipe = make_tiny_pipeline(seed=2).to("cuda")
    kwargs = dict(prompt="a corgi surfing", num_frames=13, height=32, width=48, output_type="pt")
    expected = [pipe(**kwargs, generator=torch.Generator("cuda").manual_seed(s)).frames for s in range(3)]
    pipe.enable_cuda_graphs()
    got = [pipe(**kwargs, generator=torch.Generator("cuda").manual_seed(s)).frames for s in range(3)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert pipe.transformer.cuda_graphs.replays > 0
    pipe.disable_cuda_graphs()
