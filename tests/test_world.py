"""The synthetic world (rendering, ground truth, captions, split) and the demo model's tokenizer, text encoder and VAE."""

import json

import numpy as np
import pytest
import torch

from oneforcing.training import demo_components as dc
from oneforcing.training import world


# -- rendering ---------------------------------------------------------------------------------------------------------
def test_clip_shape_range_and_determinism():
    video, caption, truth = world.render_clip(7)
    assert video.shape == (3, 81, 128, 128) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    again, caption_again, _ = world.render_clip(7)
    assert torch.equal(video, again) and caption == caption_again
    other, _, _ = world.render_clip(8)
    assert not torch.equal(video, other)
    assert truth.caption == caption and truth.seed == 7
    for obj in truth.objects:
        assert obj.centers.shape == (81, 2) and obj.sizes.shape == (81,)

    small, _, small_truth = world.render_clip(7, num_frames=9, height=64, width=96)
    assert small.shape == (3, 9, 64, 96)
    # the same scene at another resolution: positions scale with the frame, and the motion spans the whole clip
    np.testing.assert_allclose(small_truth.objects[0].centers[-1], truth.objects[0].centers[-1] * [96 / 128, 64 / 128])


def test_frame_selection_matches_full_render():
    scene = world.sample_scene(3)
    full, _ = world.render(scene, 81, 64, 64)
    window, truths = world.render(scene, 81, 64, 64, frames=slice(20, 25))
    assert torch.equal(window, full[:, 20:25])
    assert truths[0].centers.shape == (5, 2)


@pytest.mark.parametrize("kwargs", [dict(num_frames=80), dict(num_frames=0), dict(height=120), dict(width=8)])
def test_bad_sizes_are_rejected(kwargs):
    with pytest.raises(ValueError, match="num_frames|multiples of 16"):
        world.render_clip(0, **kwargs)


def _object_mask(video, truth, colour):
    """Pixels at least half covered by the object of ``colour`` (on a plain background): [T, H, W] bool.

    Nearer the object's colour than half its distance to the background; blends of another object with the
    background stay further away than that for the colours used here.
    """
    frames = (video.permute(1, 2, 3, 0) + 1) / 2  # [T, H, W, 3] in 0..1
    target = torch.tensor(world.COLOURS[colour])
    contrast = (target - torch.tensor(world.BACKGROUNDS[truth.background])).norm()
    return (frames - target).norm(dim=-1) < 0.5 * contrast


@pytest.mark.parametrize("shape", world.SHAPES)
def test_truth_centre_is_the_rendered_centroid(shape):
    motions = {"square": "moves left", "circle": "bounces", "triangle": "grows", "diamond": "moves up",
               "cross": "shrinks"}
    caption = f"a yellow {shape} {motions[shape]} and a red circle moves down on a dark blue background"
    for seed in range(11, 60):  # the first layout where the objects are apart in enough frames
        video, _, truth = world.render_clip(seed, caption=caption, height=96, width=128)
        below, above = truth.objects  # the red circle is drawn on top
        gap = np.linalg.norm(below.centers - above.centers, axis=1) - world.EXTENT * (below.sizes + above.sizes)
        apart = gap > 2
        if apart.sum() >= 20:
            break
    assert apart.sum() >= 20
    ys, xs = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    for obj, frames in [(below, apart), (above, np.ones(81, bool))]:
        mask = _object_mask(video, truth, obj.colour)[frames]
        area = mask.sum((1, 2)).float()
        centroid = torch.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], dim=1)
        error = (centroid - torch.from_numpy(obj.centers[frames]).float()).norm(dim=1)
        assert error.max() < 0.6, (obj.shape, error.max())
    area = _object_mask(video, truth, below.colour).sum((1, 2))
    if below.motion == "grows":
        assert area[-1] > 4 * area[0]
    if below.motion == "shrinks":
        assert area[0] > 4 * area[-1]


def test_motions_move_the_way_captions_say():
    for motion, (dx, dy) in {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1),
                             "moves down": (0, 1)}.items():
        _, _, truth = world.render_clip(5, caption=f"a white square {motion} on a black background")
        delta = truth.objects[0].centers[-1] - truth.objects[0].centers[0]
        assert np.sign(np.round(delta)).tolist() == [dx, dy]
        assert np.abs(delta).max() > 0.3 * 128
    _, _, truth = world.render_clip(5, caption="a white square bounces on a black background")
    height = truth.objects[0].centers[:, 1].max() - truth.objects[0].centers[:, 1]  # above the floor, pixels
    assert height[0] == pytest.approx(0) and height[-1] == pytest.approx(0, abs=1e-6)
    hops = ((height[1:-1] > height[:-2]) & (height[1:-1] >= height[2:])).sum()
    assert height.max() > 0.2 * 128 and hops >= 2


def test_objects_stay_inside_the_frame():
    for seed in range(40):
        _, _, truth = world.render_clip(seed, num_frames=21, height=64, width=64, two_object_prob=1.0)
        for obj in truth.objects:
            extent = world.EXTENT * obj.sizes
            assert (obj.centers - extent[:, None] >= 0).all() and (obj.centers + extent[:, None] <= 64).all()


# -- captions and split ------------------------------------------------------------------------------------------------
def test_captions_parse_back_to_the_truth():
    for split in world.SPLITS:
        for seed in range(60):
            _, caption, truth = world.render_clip(seed, split, num_frames=1, height=16, width=16,
                                                  two_object_prob=0.5, texture_prob=0.5)
            spec = world.parse_caption(caption)
            assert spec.objects == tuple((o.colour, o.shape, o.motion) for o in truth.objects)
            assert (spec.background, spec.texture) == (truth.background, truth.texture)
            assert world.caption_split(caption) == split
    spec = world.parse_caption("  A Purple   Diamond grows and a green cross bounces on a GRAY striped background. ")
    assert spec.objects == (("purple", "diamond", "grows"), ("green", "cross", "bounces"))
    assert (spec.background, spec.texture) == ("gray", "striped")
    for bad in ["a corgi surfing a wave", "a red circle moves left", "a pink circle moves left on a black background"]:
        with pytest.raises(ValueError, match="not a sentence of this world"):
            world.parse_caption(bad)


def test_heldout_split_is_disjoint_and_covers_every_attribute():
    train, heldout = set(world.combinations("train")), set(world.combinations("heldout"))
    assert not train & heldout and len(train | heldout) == len(world.COLOURS) * len(world.SHAPES) * len(world.MOTIONS)
    assert 0.1 < len(heldout) / len(train | heldout) < 0.2
    for index, names in enumerate((world.COLOURS, world.SHAPES, world.MOTIONS)):
        assert {combo[index] for combo in train} == set(names)
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # every pair of attributes still seen in training
        assert {(c[a], c[b]) for c in train} == {(c[a], c[b]) for c in train | heldout}

    train_captions = {world.sample_scene(s, "train").caption for s in range(300)}
    heldout_captions = {world.sample_scene(s, "heldout").caption for s in range(300)}
    assert not train_captions & heldout_captions
    prompts = world.heldout_prompts(12, seed=1)
    assert len(set(prompts)) == 12 and prompts == world.heldout_prompts(12, seed=1)
    assert all(world.caption_split(p) == "heldout" for p in prompts)
    with pytest.raises(ValueError, match="split"):
        world.sample_scene(0, "test")


def test_dataset_and_collate():
    dataset = world.WorldDataset(4, "heldout", num_frames=5, height=32, width=48, base_seed=100)
    assert len(dataset) == 4
    video, caption, truth = dataset[2]
    assert torch.equal(video, world.render_clip(102, "heldout", 5, 32, 48)[0]) and truth.split == "heldout"
    with pytest.raises(IndexError):
        dataset[4]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=world.collate_clips)
    videos, captions, truths = next(iter(loader))
    assert videos.shape == (2, 3, 5, 32, 48) and len(captions) == len(truths) == 2


# -- tokenizer and text encoder ----------------------------------------------------------------------------------------
def test_tokenizer_and_text_encoder_round_trip(tmp_path):
    from transformers import AutoTokenizer, T5Tokenizer, UMT5EncoderModel

    tokenizer = dc.build_tokenizer(tmp_path / "tokenizer")
    encoder = dc.build_text_encoder(len(tokenizer), d_model=32, num_layers=2, num_heads=4, d_ff=64,
                                    out_dir=tmp_path / "text_encoder")
    loaded = T5Tokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert type(AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))).__name__ == "T5Tokenizer"
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    caption = "a red circle moves left and a blue square grows on a dark green checkered background"
    ids = loaded(caption).input_ids
    assert ids == tokenizer(caption).input_ids and ids[-1] == 1 and 2 not in ids
    assert len(ids) == len(caption.split()) + 1  # every word is one piece
    assert loaded("A Red  CIRCLE moves left").input_ids == loaded("a red circle moves left").input_ids
    assert 2 in loaded("a zebra").input_ids  # letters never seen in captions are <unk>, not silently dropped

    reloaded = UMT5EncoderModel.from_pretrained(str(tmp_path / "text_encoder"))
    captions = world.heldout_prompts(6, seed=3) + ["a red circle moves left on a black background",
                                                    "a red circle moves right on a black background"]
    a, _ = dc.encode_captions(loaded, encoder, captions)
    b, _ = dc.encode_captions(loaded, reloaded, captions)
    assert torch.equal(a, b)
    separation = dc.caption_separation(loaded, reloaded, captions)
    assert separation["min_relative_distance"] > 0.1  # one changed word moves the embedding clearly
    again = dc.build_text_encoder(len(tokenizer), d_model=32, num_layers=2, num_heads=4, d_ff=64)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), encoder.parameters()))  # fixed seed


def test_tokenizer_feeds_the_pipeline(tmp_path):
    from conftest import make_tiny_transformer, make_tiny_vae

    from oneforcing import OneForcingPipeline, OneForcingScheduler

    tokenizer = dc.build_tokenizer()
    encoder = dc.build_text_encoder(len(tokenizer), d_model=32, num_heads=4, d_ff=64)
    pipe = OneForcingPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=make_tiny_transformer(),
                              vae=make_tiny_vae(), scheduler=OneForcingScheduler())
    embeds = pipe.encode_prompt(["a red circle moves left on a black background"], max_sequence_length=32)
    assert embeds.shape == (1, 32, 32)
    assert embeds[0, :10].abs().sum(-1).min() > 0 and embeds[0, 10:].abs().max() == 0  # 9 words + </s>


def test_precompiled_charsmap_errors_clearly():
    with pytest.raises(ValueError, match="normaliser"):
        dc.precompiled_charsmap(b"\x0a\x00")


# -- VAE ---------------------------------------------------------------------------------------------------------------
def test_vae_batch_windows_and_crops():
    batch = dc.vae_batch(0, 3, 5, 32)
    assert batch.shape == (3, 3, 5, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch, dc.vae_batch(0, 3, 5, 32))
    assert dc.vae_batch(1, 1, 9, 128).shape == (1, 3, 9, 128, 128)
    with pytest.raises(ValueError, match="STEPSxCROPxFRAMESxBATCH"):
        dc.VaeStage.parse("10x64x5")
    with pytest.raises(ValueError, match="frames 1 \\+ 4k"):
        dc.VaeStage.parse("10x64x4x2")


def test_a_few_vae_steps_reduce_the_loss():
    vae = dc.build_vae(base_dim=8, seed=0)
    video = dc.vae_batch(5, 2, 5, 32)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        loss, parts = dc.vae_loss(vae, video, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["loss"])
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_vae_training_resumes_exactly(tmp_path):
    stages = [dc.VaeStage(2, 32, 5, 1), dc.VaeStage(2, 16, 5, 1)]

    class Crash(Exception):
        pass

    def crash_at_2(line):
        if json.loads(line)["step"] == 2:
            raise Crash

    unbroken = dc.build_vae(base_dim=8, seed=1)
    dc.train_vae(unbroken, stages, log_every=1, log=lambda line: None)
    resumed = dc.build_vae(base_dim=8, seed=1)
    state = tmp_path / "vae.pt"
    with pytest.raises(Crash):
        dc.train_vae(resumed, stages, state_path=state, save_every=2, log_every=1, log=crash_at_2)
    assert torch.load(state, weights_only=True)["step"] == 2
    resumed = dc.build_vae(base_dim=8, seed=1)
    lines = []
    dc.train_vae(resumed, stages, state_path=state, save_every=2, log_every=1, log=lines.append)
    assert lines[0].startswith("resumed VAE training at step 2/4")
    for (name, p), q in zip(unbroken.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name

    other = dc.build_vae(base_dim=16)
    with pytest.raises(ValueError, match="not a training state of this VAE"):
        dc.train_vae(other, stages, state_path=state)


def test_cli_builds_loadable_parts_with_normalising_statistics(tmp_path):
    from diffusers import AutoencoderKLWan
    from transformers import T5Tokenizer, UMT5EncoderModel

    from oneforcing.pipelines.vae_streaming import normalize_latents

    report = dc.main(["--out", str(tmp_path), "--vae-stages", "1x32x5x1", "--vae-base-dim", "8", "--text-dim", "32",
                      "--eval-clips", "1", "--stat-clips", "2", "--eval-frames", "5"])
    assert set(report) == {"tokenizer", "text_encoder", "vae"}
    assert json.loads((tmp_path / "report.json").read_text())["vae"]["heldout_psnr_db"] == report["vae"]["heldout_psnr_db"]
    tokenizer = T5Tokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(str(tmp_path / "text_encoder"))
    assert encoder.config.d_model == 32 and encoder.config.vocab_size == len(tokenizer)
    vae = AutoencoderKLWan.from_pretrained(str(tmp_path / "vae"))
    assert vae.config.z_dim == 16 and len(vae.config.latents_mean) == 16
    # the stored statistics normalise the latents of the clips they came from to zero mean, unit std per channel
    with torch.no_grad():
        z = torch.cat([vae.encode(world.render_clip(10_000 + i, num_frames=5)[0][None]).latent_dist.mode()
                       for i in range(2)], dim=2)
    normalised = normalize_latents(z, vae).transpose(0, 1).flatten(1)
    torch.testing.assert_close(normalised.mean(1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(1), torch.ones(16), atol=1e-4, rtol=0)

    with pytest.raises(SystemExit):
        dc.main(["--out", str(tmp_path), "--parts", "decoder"])


def test_decoder_only_fine_tune_keeps_the_encoder_and_its_statistics(tmp_path):
    """``--vae-decoder-only``: the encoder (so every latent the transformers were trained on) and the stored latent
    statistics stay bit for bit; the decoder learns."""
    from diffusers import AutoencoderKLWan

    dc.main(["--out", str(tmp_path / "first"), "--parts", "vae", "--vae-stages", "1x32x5x1", "--vae-base-dim", "8",
             "--eval-clips", "1", "--stat-clips", "2", "--eval-frames", "5"])
    start = tmp_path / "first" / "vae"
    report = dc.main(["--out", str(tmp_path / "tuned"), "--parts", "vae", "--vae-init", str(start),
                      "--vae-decoder-only", "--vae-stages", "3x32x5x1", "--vae-lr", "1e-3", "--eval-clips", "1",
                      "--eval-frames", "5"])
    assert report["vae"]["decoder_only"] is True
    before, after = (AutoencoderKLWan.from_pretrained(str(folder)) for folder in (start, tmp_path / "tuned" / "vae"))
    decoder_names = {f"post_quant_conv.{n}" for n, _ in before.post_quant_conv.named_parameters()}
    decoder_names |= {f"decoder.{n}" for n, _ in before.decoder.named_parameters()}
    changed = {name for name, p in before.named_parameters() if not torch.equal(p, after.get_parameter(name))}
    assert changed and changed <= decoder_names  # only the decoder moved, and it did
    assert after.config.latents_mean == before.config.latents_mean
    assert after.config.latents_std == before.config.latents_std
    with pytest.raises(SystemExit):
        dc.main(["--out", str(tmp_path / "bad"), "--parts", "vae", "--vae-decoder-only"])  # no --vae-init


def test_a_background_colour_override_keeps_the_caption():
    """A restyled world (the demo LoRA's data): every background in the given colour, the caption unchanged."""
    plain, caption, _ = world.render_clip(5, "train", 5, 64, 64, 0.0, 0.0)
    red, same_caption, _ = world.render_clip(5, "train", 5, 64, 64, 0.0, 0.0, background_rgb=(0.92, 0.16, 0.14))
    assert same_caption == caption
    corner = (red[:, :, 0, 0] + 1) / 2  # [3, T]
    torch.testing.assert_close(corner, torch.tensor([0.92, 0.16, 0.14])[:, None].expand_as(corner))
    assert not torch.equal(plain[:, :, 0, 0], red[:, :, 0, 0])


def test_split_prompts_name_only_combinations_of_their_split():
    for split in world.SPLITS:
        prompts = world.split_prompts(split, 10, seed=2)
        assert len(set(prompts)) == 10 and prompts == world.split_prompts(split, 10, seed=2)
        assert {world.caption_split(p) for p in prompts} == {split}
    assert world.heldout_prompts(5, seed=1) == world.split_prompts("heldout", 5, seed=1)
    with pytest.raises(ValueError, match="split"):
        world.split_prompts("test", 3)


# -- text-encoder probes ---------------------------------------------------------------------------------------------
def test_ridge_probe_and_between_class_fraction_on_known_features():
    rng = np.random.default_rng(0)
    labels = [("a", "b", "c")[i % 3] for i in range(300)]
    train = np.arange(300) < 200
    one_hot = np.eye(3)[[("a", "b", "c").index(x) for x in labels]]
    readable = np.concatenate([one_hot, rng.normal(size=(300, 5))], axis=1)
    assert dc.ridge_probe_accuracy(readable, labels, train) == 1.0
    noise = rng.normal(size=(300, 8))
    assert dc.ridge_probe_accuracy(noise, labels, train) < 0.6  # chance is 1/3
    assert dc.between_class_fraction(one_hot, labels) == pytest.approx(1.0)
    assert dc.between_class_fraction(noise, labels) < 0.05


def test_word_probe_reads_words_from_a_random_encoder_and_not_from_one_that_merges_them():
    tokenizer = dc.build_tokenizer()
    encoder = dc.build_text_encoder(len(tokenizer), d_model=32, num_heads=4, d_ff=64)
    probe = dc.word_probe(tokenizer, encoder)
    assert set(probe) == set(dc.ATTRIBUTES)
    for attribute, figures in probe.items():
        assert figures["token_probe"] == 1.0, attribute  # every held-out combination's words read back
        assert figures["token_between_fraction"] > 0.5
    merged = dc.build_text_encoder(len(tokenizer), d_model=32, num_heads=4, d_ff=64)
    with torch.no_grad():  # every word the same embedding: only positions tell tokens apart
        merged.shared.weight.copy_(merged.shared.weight[3:4].expand_as(merged.shared.weight))
    for attribute, figures in dc.word_probe(tokenizer, merged).items():
        assert figures["token_probe"] < 0.5, attribute


def test_psnr_and_round_trip_of_a_vae():
    from conftest import make_tiny_vae

    video = world.render_clip(0, "train", 5, 32, 32)[0]
    assert dc.psnr_db(video, video) == pytest.approx(120.0)  # the 1e-12 floor
    assert dc.psnr_db(video + 0.2, video) == pytest.approx(-10 * np.log10(0.04 / 4), rel=1e-4)
    out = dc.vae_round_trip(make_tiny_vae(), video)
    assert out.shape == video.shape


def test_object_mask_marks_objects_not_background_or_texture():
    scene = world.Scene((world.ObjectSpec("square", "yellow", "moves left", 0.5, 0.5, 0.5, 0.5, 0.12, 0.12),),
                        "dark green", "checkered")
    video, _ = world.render(scene, 5, 64, 64)
    mask = dc.object_mask(video[None])
    assert mask.shape == (1, 1, 5, 64, 64)
    inside, outside = mask[0, 0, :, 32, 32], mask[0, 0, :, 4, 4]
    assert inside.min() == 1 and outside.max() == 0  # the texture's light squares are not objects
    radius = 0.886 * 0.12 * 64  # half the square's side
    assert abs(mask[0, 0, 0].sum().item() - (2 * radius) ** 2) < 4 * 2 * radius  # about the square's area


def test_object_weight_raises_the_loss_of_errors_on_objects_only():
    vae = dc.build_vae(base_dim=8, seed=0)
    video = dc.vae_batch(5, 2, 5, 32)
    plain, _ = dc.vae_loss(vae, video, dc.VaeLossWeights(), torch.Generator().manual_seed(0))
    weighted, _ = dc.vae_loss(vae, video, dc.VaeLossWeights(objects=4.0), torch.Generator().manual_seed(0))
    assert weighted.item() != pytest.approx(plain.item())
    flat = torch.zeros_like(video) - 0.5  # no object anywhere: the weight changes nothing
    a, _ = dc.vae_loss(vae, flat, dc.VaeLossWeights(), torch.Generator().manual_seed(0))
    b, _ = dc.vae_loss(vae, flat, dc.VaeLossWeights(objects=4.0), torch.Generator().manual_seed(0))
    assert a.item() == pytest.approx(b.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_clip_drawn_on_the_gpu_is_the_cpu_clip():
    on_cpu, caption, _ = world.render_clip(7, "train", 17, 64, 64)
    on_gpu, same_caption, _ = world.render_clip(7, "train", 17, 64, 64, device="cuda")
    assert on_gpu.device.type == "cuda" and same_caption == caption
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=0)


def test_the_device_argument_draws_there():
    default, _, _ = world.render_clip(3, "train", 5, 32, 32)
    explicit, _, _ = world.render_clip(3, "train", 5, 32, 32, device=torch.device("cpu"))
    assert torch.equal(default, explicit) and explicit.device.type == "cpu"
