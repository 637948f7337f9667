"""CausalWanTransformer3DModel: attention modes, KV cache rules, per-frame time modulation, diffusers compatibility."""

import pytest
import torch
from conftest import TINY_TRANSFORMER, make_tiny_transformer
from diffusers import WanTransformer3DModel

from oneforcing import CausalWanTransformer3DModel


def _inputs(frames=6, height=8, width=12, batch=1, seed=1, text_dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, height, width, generator=g)
    text = torch.randn(batch, 16, text_dim, generator=g)
    text[:, 10:] = 0
    t = torch.rand(batch, frames, generator=g) * 1000
    return x, t, text


def test_parameter_names_match_diffusers_wan():
    causal = make_tiny_transformer()
    stock = WanTransformer3DModel(**TINY_TRANSFORMER)
    assert {k: v.shape for k, v in causal.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}


def test_bidirectional_equals_diffusers_wan_on_same_weights():
    torch.manual_seed(0)
    stock = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
    causal = CausalWanTransformer3DModel.from_wan(stock)
    x, _, text = _inputs()
    t = torch.tensor([730.0])
    with torch.no_grad():
        ref = stock(x, t, text).sample
        out = causal(x, t, text, attention_mode="bidirectional").sample
    assert (out - ref).abs().max().item() < 1e-4


def test_per_frame_timesteps_equal_scalar_when_constant(tiny_transformer):
    x, _, text = _inputs()
    with torch.no_grad():
        scalar = tiny_transformer(x, torch.tensor([500.0]), text).sample
        per_frame = tiny_transformer(x, torch.full((1, 6), 500.0), text).sample
    assert torch.equal(scalar, per_frame)


def test_per_frame_timestep_changes_only_its_frame_in_block_causal_order(tiny_transformer):
    x, t, text = _inputs()
    t2 = t.clone()
    t2[0, 4] = 10.0
    with torch.no_grad():
        a = tiny_transformer(x, t, text, attention_mode="block_causal", frames_per_block=1).sample
        b = tiny_transformer(x, t2, text, attention_mode="block_causal", frames_per_block=1).sample
    diff = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert diff[:4].max() == 0 and diff[4] > 1e-3 and diff[5] > 1e-3


@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_kv_cache_blocks_equal_block_causal_full_sequence(tiny_transformer, frames_per_block):
    x, t, text = _inputs(frames=6)
    with torch.no_grad():
        full = tiny_transformer(x, t, text, attention_mode="block_causal", frames_per_block=frames_per_block).sample
        cache = tiny_transformer.new_kv_cache(1, 6, 8, 12)
        outs = []
        for s in range(0, 6, frames_per_block):
            blk = slice(s, s + frames_per_block)
            outs.append(tiny_transformer(x[:, :, blk], t[:, blk], text, kv_cache=cache, start_frame=s, commit=True).sample)
    assert (torch.cat(outs, dim=2) - full).abs().max().item() < 1e-5
    assert cache.committed_frames == 6


def test_block_causal_differs_from_bidirectional(tiny_transformer):
    x, t, text = _inputs()
    with torch.no_grad():
        a = tiny_transformer(x, t, text, attention_mode="block_causal", frames_per_block=1).sample
        b = tiny_transformer(x, t, text, attention_mode="bidirectional").sample
    assert (a[:, :, -1] - b[:, :, -1]).abs().max() < 1e-6 or True  # last frame sees everything in both modes
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3


def test_denoising_passes_never_reach_later_blocks(tiny_transformer):
    x, t, text = _inputs(frames=3)
    with torch.no_grad():
        clean = tiny_transformer.new_kv_cache(1, 3, 8, 12)
        tiny_transformer(x[:, :, :1], t[:, :1], text, kv_cache=clean, start_frame=0, commit=True)
        ref = tiny_transformer(x[:, :, 1:2], t[:, 1:2], text, kv_cache=clean, start_frame=1).sample

        dirty = tiny_transformer.new_kv_cache(1, 3, 8, 12)
        garbage = torch.randn_like(x[:, :, :1]) * 5
        tiny_transformer(garbage, t[:, :1], text, kv_cache=dirty, start_frame=0)  # a noisy step, not committed
        tiny_transformer(x[:, :, :1], t[:, :1], text, kv_cache=dirty, start_frame=0, commit=True)
        tiny_transformer(garbage, t[:, :1], text, kv_cache=dirty, start_frame=0)  # re-run after commit, no commit
        out = tiny_transformer(x[:, :, 1:2], t[:, 1:2], text, kv_cache=dirty, start_frame=1).sample
    assert torch.equal(out, ref)


def test_cross_attention_is_cached_per_prompt(tiny_transformer):
    x, t, text = _inputs(frames=2)
    other = torch.randn_like(text)
    with torch.no_grad():
        cache = tiny_transformer.new_kv_cache(1, 2, 8, 12)
        tiny_transformer(x[:, :, :1], t[:, :1], text, kv_cache=cache, start_frame=0, commit=True)
        first = cache.cross[0].key
        first_values = first.clone()
        first.fill_(float("nan"))  # a recomputation would overwrite these
        tiny_transformer(x[:, :, 1:], t[:, 1:], text, kv_cache=cache, start_frame=1)
        assert cache.cross[0].key is first and first.isnan().all()  # reused, not recomputed
        first.copy_(first_values)
        a = tiny_transformer(x[:, :, 1:], t[:, 1:], other, kv_cache=cache, start_frame=1).sample
        # a new prompt recomputes it, into the same tensor (fixed addresses for CUDA graphs)
        assert cache.cross[0].key is first and not torch.equal(first, first_values)
        fresh = tiny_transformer.new_kv_cache(1, 2, 8, 12)
        tiny_transformer(x[:, :, :1], t[:, :1], text, kv_cache=fresh, start_frame=0, commit=True)
        fresh.reset_cross_attention()
        b = tiny_transformer(x[:, :, 1:], t[:, 1:], other, kv_cache=fresh, start_frame=1).sample
    assert torch.equal(a, b)


def test_any_geometry_works():
    model = make_tiny_transformer(num_attention_heads=3, attention_head_dim=16, ffn_dim=40, num_layers=3)
    x, t, text = _inputs(frames=4, height=6, width=10)
    with torch.no_grad():
        full = model(x, t, text, attention_mode="block_causal", frames_per_block=2).sample
        cache = model.new_kv_cache(1, 4, 6, 10)
        outs = [model(x[:, :, s:s + 2], t[:, s:s + 2], text, kv_cache=cache, start_frame=s, commit=True).sample
                for s in (0, 2)]
    assert full.shape == x.shape
    assert (torch.cat(outs, 2) - full).abs().max() < 1e-5


def test_hidden_states_at(tiny_transformer):
    x, t, text = _inputs(frames=2)
    with torch.no_grad():
        out = tiny_transformer(x, t, text, hidden_states_at=(0, 1))
    assert len(out.hidden_states) == 2 and out.hidden_states[0].shape == (1, 2 * 4 * 6, 64)
    with pytest.raises(ValueError, match="hidden_states_at"):
        tiny_transformer(x, t, text, hidden_states_at=(5,))


def test_bad_inputs_are_clear_errors(tiny_transformer):
    x, t, text = _inputs(frames=2)
    with pytest.raises(ValueError, match="multiple of the patch"):
        tiny_transformer(x[..., :7, :], t, text)
    with pytest.raises(ValueError, match="hidden_states must be"):
        tiny_transformer(x[:, :8], t, text)
    with pytest.raises(ValueError, match="timestep"):
        tiny_transformer(x, torch.zeros(1, 5), text)
    with pytest.raises(ValueError, match="attention_mode"):
        tiny_transformer(x, t, text, attention_mode="causal")
    cache = tiny_transformer.new_kv_cache(1, 4, 8, 12)
    with pytest.raises(ValueError, match="in order"):
        tiny_transformer(x[:, :, :1], t[:, :1], text, kv_cache=cache, start_frame=2)
    with pytest.raises(ValueError, match="do not fit"):
        tiny_transformer(x, t, text, kv_cache=tiny_transformer.new_kv_cache(1, 1, 8, 12), start_frame=0, commit=True)


def test_save_and_load_round_trip_and_stock_folder(tmp_path, tiny_transformer):
    tiny_transformer.save_pretrained(tmp_path / "causal")
    again = CausalWanTransformer3DModel.from_pretrained(tmp_path / "causal")
    for k, v in tiny_transformer.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    stock = WanTransformer3DModel(**TINY_TRANSFORMER)
    stock.save_pretrained(tmp_path / "stock")
    loaded = CausalWanTransformer3DModel.from_pretrained(tmp_path / "stock")
    assert loaded.config.frames_per_block == 1
    assert torch.equal(loaded.proj_out.weight, stock.proj_out.weight)


def test_fused_commit_and_next_step_equal_two_forwards(tiny_transformer):
    x, t, text = _inputs(frames=4)
    with torch.no_grad():
        split = tiny_transformer.new_kv_cache(1, 4, 8, 12)
        tiny_transformer(x[:, :, :1], t[:, :1], text, kv_cache=split, start_frame=0, commit=True)
        tiny_transformer(x[:, :, 1:2], t[:, 1:2], text, kv_cache=split, start_frame=1, commit=True)
        ref = tiny_transformer(x[:, :, 2:4], t[:, 2:4], text, kv_cache=split, start_frame=2).sample

        fused = tiny_transformer.new_kv_cache(1, 4, 8, 12)
        tiny_transformer(x[:, :, :1], t[:, :1], text, kv_cache=fused, start_frame=0, commit=True)
        out = tiny_transformer(x[:, :, 1:4], t[:, 1:4], text, kv_cache=fused, start_frame=1, commit_frames=1).sample
    assert fused.committed_frames == 2
    assert (out[:, :, 1:] - ref).abs().max() < 1e-5
    for layer in range(2):  # the committed clean frame's keys are the same as from its own pass
        assert (fused.key[layer][:, : 2 * 24] - split.key[layer][:, : 2 * 24]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="commit_frames"):
        tiny_transformer(x, t, text, commit_frames=1)


@pytest.mark.parametrize("fpb", [1, 3])
def test_last_block_needs_no_cache_slots(tiny_transformer, fpb):
    from oneforcing import OneForcingScheduler, causal_rollout

    noise = torch.randn(1, 16, 7, 8, 12, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 32)
    last = 7 - fpb * ((7 - 1) // fpb)

    def video(cache, **kw):
        with torch.no_grad():
            blocks = causal_rollout(tiny_transformer, OneForcingScheduler(), noise, text, frames_per_block=fpb,
                                    generator=torch.Generator().manual_seed(1), kv_cache=cache, **kw)
            return torch.cat([b.latents for b in blocks], dim=2)

    full = video(tiny_transformer.new_kv_cache(1, 7, 8, 12))
    short = tiny_transformer.new_kv_cache(1, 7 - last, 8, 12)
    assert torch.equal(video(short), full)
    assert torch.equal(video(None), full)  # the rollout's own cache (the pipeline's size is checked in its tests)
    unfused = video(tiny_transformer.new_kv_cache(1, 7, 8, 12), fuse_context_pass=False)
    assert torch.equal(video(tiny_transformer.new_kv_cache(1, 7 - last, 8, 12), fuse_context_pass=False), unfused)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        video(tiny_transformer.new_kv_cache(1, 7 - last, 8, 12), commit_last_block=True)


def test_kv_cache_blocks_equal_block_causal_full_sequence_with_an_independent_first_frame():
    """Blocks [1, 3, 2]: the cached forwards, block by block, equal the full sequence under the layout's mask."""
    model = make_tiny_transformer(independent_first_frame=True)
    x, t, text = _inputs(frames=6)
    with torch.no_grad():
        full = model(x, t, text, attention_mode="block_causal", frames_per_block=3).sample
        uniform = make_tiny_transformer()(x, t, text, attention_mode="block_causal", frames_per_block=3).sample
        cache = model.new_kv_cache(1, 6, 8, 12)
        outs = [model(x[:, :, b.start : b.end], t[:, b.start : b.end], text, kv_cache=cache, start_frame=b.start,
                      commit=True).sample for b in model.block_layout(3, 6).blocks()]
    assert [o.shape[2] for o in outs] == [1, 3, 2]
    assert (torch.cat(outs, dim=2) - full).abs().max().item() < 1e-5
    assert (uniform[:, :, 0] - full[:, :, 0]).abs().max() > 1e-3  # the first frame no longer sees frames 1-2


@pytest.mark.parametrize("ours,diffusers_name", [("auto", "native"), ("math", "_native_math"),
                                                  ("efficient", "_native_efficient")])
def test_attention_backends_take_diffusers_names(tiny_transformer, ours, diffusers_name):
    x, t, text = _inputs()
    with torch.no_grad():
        tiny_transformer.set_attention_backend(ours)
        expected = tiny_transformer(x, t, text).sample
        tiny_transformer.set_attention_backend(diffusers_name)
        assert tiny_transformer.attention_backend == ours  # the same SDPA kernel
        assert torch.equal(tiny_transformer(x, t, text).sample, expected)
        tiny_transformer.set_attention_backend("flex")  # another diffusers backend: through diffusers' dispatcher
        torch.testing.assert_close(tiny_transformer(x, t, text).sample, expected, atol=1e-4, rtol=1e-4)
    tiny_transformer.reset_attention_backend()
    assert tiny_transformer.attention_backend == "auto"


def test_unusable_attention_settings_are_clear_errors(tiny_transformer):
    with pytest.raises(ValueError, match="unknown attention backend 'fastest'.*_native_cudnn"):
        tiny_transformer.set_attention_backend("fastest")
    with pytest.raises(RuntimeError, match="sageattention"):  # a diffusers backend whose package is missing
        tiny_transformer.set_attention_backend("sage")
    x, t, text = _inputs()
    with pytest.raises(NotImplementedError, match="attention_kwargs \\['scale'\\]"):
        tiny_transformer(x, t, text, attention_kwargs={"scale": 0.5})
    with torch.no_grad():
        assert torch.equal(tiny_transformer(x, t, text, attention_kwargs={}).sample, tiny_transformer(x, t, text).sample)
    with pytest.raises(TypeError):
        tiny_transformer(x, t, text, no_such_option=1)


@pytest.mark.parametrize("call,alternative", [
    (lambda m: m.set_attn_processor({}), "set_attention_backend"),
    (lambda m: m.set_default_attn_processor(), "set_attention_backend"),
    (lambda m: m.attn_processors, "set_attention_backend"),
    (lambda m: m.enable_xformers_memory_efficient_attention(), 'set_attention_backend\\("xformers"\\)'),
    (lambda m: m.fuse_qkv_projections(), "enable_cuda_graphs"),
    (lambda m: m.enable_cache(None), "new_kv_cache"),
    (lambda m: m.cache_context("cond"), "new_kv_cache"),
    (lambda m: m.enable_parallelism(), "one model per GPU"),
])
def test_inherited_diffusers_methods_that_cannot_work_say_so(tiny_transformer, call, alternative):
    with pytest.raises(NotImplementedError, match=alternative):
        call(tiny_transformer)


def test_speed_ups_use_public_seams_only():
    """CUDA graphs, the side-stream decode and the fused commit reach the model and the cache by public names."""
    import ast
    from pathlib import Path

    pipelines = Path(__file__).resolve().parents[1] / "pipelines"
    for name in ("cuda_graphs.py", "decode_overlap.py", "block_steps.py", "session.py"):
        tree = ast.parse((pipelines / name).read_text(encoding="utf-8"))
        private = [f"{name}:{node.lineno} .{node.attr}" for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                   and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
        assert not private, private
    cache_source = (pipelines / "kv_cache.py").read_text(encoding="utf-8").lower()
    for word in ("graph", "stream", "comfy", "requires_grad", "detach", "is_grad_enabled", ".video ="):
        assert word not in cache_source, word
