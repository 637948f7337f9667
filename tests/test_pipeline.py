"""OneForcingPipeline end to end on tiny real models: outputs, determinism, streaming, callbacks, save/load, errors."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_pipeline
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from oneforcing import CausalWanTransformer3DModel, OneForcingPipeline, OneForcingScheduler

ARGS = dict(num_frames=9, height=32, width=48)


def _run(pipe, seed=0, **kw):
    return pipe("a corgi surfing a wave", generator=torch.Generator().manual_seed(seed), **{**ARGS, **kw}).frames


def test_np_output_shape_range_and_determinism(tiny_pipeline):
    a = _run(tiny_pipeline)
    assert a.shape == (1, 9, 32, 48, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, _run(tiny_pipeline))  # same seed, bit-identical on CPU
    assert not np.array_equal(a, _run(tiny_pipeline, seed=1))


def test_output_types(tiny_pipeline):
    pt = _run(tiny_pipeline, output_type="pt")
    assert pt.shape == (1, 9, 3, 32, 48)
    pil = _run(tiny_pipeline, output_type="pil")
    assert len(pil[0]) == 9 and isinstance(pil[0][0], PIL.Image.Image)
    latents = _run(tiny_pipeline, output_type="latent")
    assert latents.shape == (1, 16, 3, 4, 6)
    assert np.allclose(pt.permute(0, 1, 3, 4, 2).numpy(), _run(tiny_pipeline), atol=1e-6)


def test_streaming_decode_equals_full_decode_of_the_latents(tiny_pipeline):
    video = _run(tiny_pipeline, output_type="pt")
    latents = _run(tiny_pipeline, output_type="latent")
    vae = tiny_pipeline.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        full = vae.decode(latents * std + mean).sample.clamp(-1, 1)
    full = (full.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
    assert (video - full).abs().max() < 1e-5


@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_stream_yields_blocks_that_concatenate_to_call(tiny_pipeline, frames_per_block):
    full = _run(tiny_pipeline, frames_per_block=frames_per_block)
    chunks = list(tiny_pipeline.stream("a corgi surfing a wave", generator=torch.Generator().manual_seed(0),
                                       frames_per_block=frames_per_block, **ARGS))
    expected_sizes = [1, 4, 4] if frames_per_block == 1 else [9]
    assert [c.shape[1] for c in chunks] == expected_sizes
    assert np.array_equal(np.concatenate(chunks, axis=1), full)


def test_chunkwise_default_comes_from_the_transformer():
    pipe = make_tiny_pipeline(frames_per_block=3)
    blocks = []
    pipe("a cat", callback_on_step_end=lambda p, i, t, kw: blocks.append(i) or {}, num_frames=17, height=32, width=32)
    assert blocks == [0, 1]  # 5 latent frames = blocks of 3 + 2


def test_latents_and_prompt_embeds_inputs(tiny_pipeline):
    noise = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # as inside the pipeline (CPU attention kernels differ with autograd on)
        embeds = tiny_pipeline.encode_prompt("a red circle moves left")
    assert embeds.shape == (1, 512, 32)
    a = tiny_pipeline(prompt_embeds=embeds, latents=noise, generator=torch.Generator().manual_seed(0), **ARGS).frames
    b = tiny_pipeline("a red circle moves left", latents=noise, generator=torch.Generator().manual_seed(0), **ARGS).frames
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="latents must have shape"):
        tiny_pipeline(prompt_embeds=embeds, latents=noise[:, :, :2], **ARGS)


def test_encode_prompt_zero_pads(tiny_pipeline):
    embeds = tiny_pipeline.encode_prompt(["a cat", "a red circle moves left on the beach"], max_sequence_length=16)
    assert embeds.shape == (2, 16, 32)
    nonzero_rows = (embeds.abs().sum(-1) > 0).sum(-1).tolist()
    assert nonzero_rows == [3, 9]  # tokens incl. </s>


def test_multi_step_first_block_changes_output(tiny_pipeline):
    one = _run(tiny_pipeline)
    four = _run(tiny_pipeline, first_block_timesteps=[1000, 750, 500, 250])
    assert not np.array_equal(one, four)


def test_callback_can_replace_latents_and_interrupt(tiny_pipeline):
    seen = []

    def callback(pipe, index, timestep, tensors):
        seen.append((index, float(timestep), tuple(tensors["latents"].shape)))
        if index == 1:
            pipe._interrupt = True
        return {"latents": torch.zeros_like(tensors["latents"])}

    latents = tiny_pipeline("a cat", callback_on_step_end=callback, output_type="latent", **ARGS).frames
    assert seen == [(0, 1000.0, (1, 16, 3, 4, 6)), (1, 1000.0, (1, 16, 3, 4, 6))]
    assert latents[:, :, :2].abs().max() == 0


def test_bad_inputs(tiny_pipeline):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_pipeline("a cat", num_frames=9, height=40, width=48)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        tiny_pipeline("a cat", num_frames=8, height=32, width=48)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_pipeline(**ARGS)
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipeline("a cat", output_type="gif", **ARGS)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        tiny_pipeline(prompt_embeds=torch.zeros(1, 8, 7), **ARGS)


def test_save_pretrained_round_trip(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path)
    assert (tmp_path / "model_index.json").exists() and (tmp_path / "scheduler/scheduler_config.json").exists()
    again = OneForcingPipeline.from_pretrained(tmp_path)
    assert isinstance(again.transformer, CausalWanTransformer3DModel)
    assert isinstance(again.scheduler, OneForcingScheduler)
    assert np.array_equal(_run(again), _run(tiny_pipeline))


def test_loads_a_wan_diffusers_folder_and_a_replacement_transformer(tmp_path, tiny_pipeline):
    stock = WanTransformer3DModel(**{k: v for k, v in tiny_pipeline.transformer.config.items()
                                     if not k.startswith("_") and k not in ("frames_per_block", "independent_first_frame")})
    stock.load_state_dict(tiny_pipeline.transformer.state_dict())
    wan = WanPipeline(tokenizer=tiny_pipeline.tokenizer, text_encoder=tiny_pipeline.text_encoder, vae=tiny_pipeline.vae,
                      transformer=stock, scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction"))
    wan.save_pretrained(tmp_path / "wan")
    pipe = OneForcingPipeline.from_pretrained(tmp_path / "wan")
    assert isinstance(pipe.transformer, CausalWanTransformer3DModel)
    assert isinstance(pipe.scheduler, OneForcingScheduler)
    assert np.array_equal(_run(pipe), _run(tiny_pipeline))
    other = make_tiny_pipeline(seed=3).transformer
    replaced = OneForcingPipeline.from_pretrained(tmp_path / "wan", transformer=other)
    assert replaced.transformer is other


@pytest.mark.parametrize("frames_per_block,capacity", [(1, 4), (3, 3)])
def test_the_kv_cache_has_no_slots_for_the_last_block(frames_per_block, capacity):
    """17 frames = 5 latent frames: frame-wise the last block is frame 4, chunk-wise frames 3-4 after [0, 1, 2]."""
    pipe = make_tiny_pipeline(seed=1, frames_per_block=frames_per_block)
    seen = []

    def record(p, index, timestep, tensors):
        seen.append(p.kv_cache.capacity)
        return {}

    pipe("a corgi", num_frames=17, height=32, width=48, output_type="latent", callback_on_step_end=record)
    assert seen and set(seen) == {capacity}
