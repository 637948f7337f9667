"""GenerationSession: one block at a time, prompt switches, snapshots that rewind or branch a video."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_transformer

from oneforcing import OneForcingScheduler, causal_rollout
from oneforcing.pipelines.block_steps import PromptHandle
from oneforcing.pipelines.session import CachePolicy, GenerationSession, NoiseSource, SamplingSettings

SHAPE = (1, 16, 4, 6)  # (B, C, h, w) of the latents
POLICIES = {"full": CachePolicy(), "rolling": CachePolicy(window_frames=2, sink_frames=1, relative_positions=True)}


def _text(seed: int) -> torch.Tensor:
    return torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(seed))


def _session(model, policy: CachePolicy, seed: int = 0, frames: int = 6, fpb: int = 1, prompt=None):
    noise = NoiseSource.from_generator(torch.Generator().manual_seed(seed), SHAPE, "cpu")
    layout = model.block_layout(fpb, frames)
    return GenerationSession(model, OneForcingScheduler(denoising_timesteps=[1000, 500]),
                             prompt if prompt is not None else PromptHandle(_text(1)), layout, noise,
                             cache_policy=policy)


def _rest(session) -> torch.Tensor:
    blocks = []
    while not session.finished:
        blocks.append(session.next_block().latents)
    return torch.cat(blocks, dim=2)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fpb", [1, 2])
@torch.no_grad()
def test_a_restored_snapshot_continues_bit_for_bit(policy, fpb):
    model = make_tiny_transformer(seed=3)
    whole = _rest(_session(model, POLICIES[policy], fpb=fpb))
    session = _session(model, POLICIES[policy], fpb=fpb)
    first = torch.cat([session.next_block().latents for _ in range(2)], dim=2)
    saved = session.snapshot()
    rest = _rest(session)
    assert torch.equal(torch.cat([first, rest], dim=2), whole)
    session.restore(saved)  # rewind: the cache, the position, the pending clean pass and the noise come back
    again = _rest(session)
    assert torch.equal(again, rest)


@pytest.mark.parametrize("policy", POLICIES)
@torch.no_grad()
def test_a_branch_with_another_prompt_equals_a_video_switched_there(policy):
    model = make_tiny_transformer(seed=3)
    session = _session(model, POLICIES[policy])
    first = torch.cat([session.next_block().latents for _ in range(3)], dim=2)
    saved = session.snapshot()
    plain = _rest(session)
    session.restore(saved)
    session.set_prompt(_text(2))
    branch = _rest(session)
    assert not torch.allclose(branch, plain)
    # the same video made in one go with a prompt switch at latent frame 3
    scratch = _session(model, POLICIES[policy])
    blocks = [scratch.next_block().latents for _ in range(3)]
    assert torch.equal(torch.cat(blocks, dim=2), first)  # the frames up to the switch are the same
    scratch.set_prompt(_text(2))
    assert torch.equal(_rest(scratch), branch)
    # and the rollout's prompt switches, which drive a session the same way
    noise = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(5))
    kwargs = dict(generator=torch.Generator().manual_seed(6), frames_per_block=1)

    def cache():
        return model.new_kv_cache(1, 5, 4, 6, **POLICIES[policy].rolling_settings())

    switched = list(causal_rollout(model, OneForcingScheduler(), noise, _text(1), kv_cache=cache(),
                                   prompt_switches={3: _text(2)}, **kwargs))
    plain_rollout = list(causal_rollout(model, OneForcingScheduler(), noise, _text(1), kv_cache=cache(), **kwargs))
    for a, b in zip(switched[:3], plain_rollout[:3]):
        assert torch.equal(a.latents, b.latents)


@torch.no_grad()
def test_the_prompt_handle_keeps_cross_attention_even_in_inference_mode():
    model = make_tiny_transformer(seed=3)
    calls = []
    model.condition_embedder.text_embedder.register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        session = _session(model, POLICIES["full"], prompt=PromptHandle(_text(1)))
        video = _rest(session)
    assert len(calls) == 1  # once per prompt, not per forward
    assert torch.equal(video, _rest(_session(model, POLICIES["full"])))


@torch.no_grad()
def test_session_settings_and_errors():
    model = make_tiny_transformer(seed=3)
    session = _session(model, POLICIES["full"], frames=2)
    assert session.next_block_info.start == 0 and not session.finished
    _rest(session)
    assert session.finished
    with pytest.raises(RuntimeError, match="complete"):
        session.next_block()
    with pytest.raises(ValueError, match="rolling KV cache"):
        GenerationSession(model, OneForcingScheduler(), _text(1), model.block_layout(1, None),
                          NoiseSource.from_generator(None, SHAPE, "cpu"))
    with pytest.raises(ValueError, match="do not match"):
        _session(model, POLICIES["full"]).set_prompt(torch.randn(2, 16, 32))
    unfused = GenerationSession(model, OneForcingScheduler(denoising_timesteps=[1000, 500]), PromptHandle(_text(1)),
                                model.block_layout(1, 6),
                                NoiseSource.from_generator(torch.Generator().manual_seed(0), SHAPE, "cpu"),
                                sampling=SamplingSettings(fuse_context_pass=False))
    torch.testing.assert_close(_rest(unfused), _rest(_session(model, POLICIES["full"])), atol=1e-5, rtol=1e-5)


def test_the_pipeline_keeps_no_run_state():
    pipe = make_tiny_pipeline(seed=1)
    seen = []
    pipe("a corgi", num_frames=9, height=32, width=48, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(p.kv_cache is not None) or {})
    assert seen == [True, True, True]
    assert pipe.kv_cache is None and pipe.latents is None and pipe._run is None


@pytest.mark.parametrize("independent", [False, True])
@torch.no_grad()
def test_the_cached_rollout_equals_the_block_causal_full_sequence(independent):
    """Each generated block equals the block-causal forward over the clean blocks before it (at t = 0) and its own
    noise: what the KV cache holds is exactly the full sequence's context, for either layout."""
    model = make_tiny_transformer(seed=3, independent_first_frame=independent)
    noise = torch.randn(1, 16, 7, 4, 6, generator=torch.Generator().manual_seed(5))
    text = _text(1)
    blocks = list(causal_rollout(model, OneForcingScheduler(), noise, text, frames_per_block=3))
    assert [b.latents.shape[2] for b in blocks] == ([1, 3, 3] if independent else [3, 3, 1])
    scheduler = OneForcingScheduler()
    for block in blocks:
        start, end = block.start_frame, block.start_frame + block.latents.shape[2]
        clean = torch.cat([b.latents for b in blocks if b.start_frame < start] + [noise[:, :, start:end]], dim=2)
        t = torch.cat([torch.zeros(1, start), torch.full((1, end - start), 1000.0)], dim=1)
        flow = model(clean, t, text, attention_mode="block_causal", frames_per_block=3).sample[:, :, start:end]
        x0 = scheduler.x0_from_flow(noise[:, :, start:end], flow, 1000.0)
        torch.testing.assert_close(block.latents, x0, atol=1e-5, rtol=1e-5)


def test_the_pipeline_runs_an_independent_first_frame_layout():
    pipe = make_tiny_pipeline(seed=1, frames_per_block=3)
    pipe.transformer.register_to_config(independent_first_frame=True)
    kwargs = dict(num_frames=21, height=32, width=48, output_type="latent")
    sizes = [b.shape[2] for b in pipe.stream("a corgi", generator=torch.Generator().manual_seed(0), **kwargs)]
    assert sizes == [1, 3, 2]
    video = pipe("a corgi", generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.transformer.register_to_config(independent_first_frame=False)
    uniform = pipe("a corgi", generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert video.shape == uniform.shape == (1, 16, 6, 4, 6)
    assert not torch.allclose(video, uniform)
