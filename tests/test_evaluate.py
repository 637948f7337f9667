"""Evaluation metrics on world clips (ground truth scores right, damaged clips score wrong) and the evaluate command."""

import json
import os
import shutil
import signal

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import make_tiny_pipeline

from oneforcing.training import evaluate as ev
from oneforcing.training import metrics
from oneforcing.training import world

FRAMES, SIZE = 17, 64
TINY = ["--num-frames", "5", "--height", "32", "--width", "32", "--max-sequence-length", "16", "--warmup", "0",
        "--num-prompts", "1"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate") / "tiny"
    make_tiny_pipeline().save_pretrained(folder)
    return folder


def clip(caption: str, seed: int = 0, num_frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    video, _, _ = world.render_clip(seed, "heldout", num_frames, size, size, caption=caption)
    return metrics.world_frames(video)


def test_ground_truth_scores_full_adherence_over_every_motion_and_shape():
    prompts = world.heldout_prompts(14, seed=0)
    # every motion and shape appears among these held-out prompts
    specs = [world.parse_caption(p).objects[0] for p in prompts]
    assert {m for _, _, m in specs} == set(world.MOTIONS) and {s for _, s, _ in specs} == set(world.SHAPES)
    for index, prompt in enumerate(prompts):
        result = metrics.evaluate_clip(clip(prompt, seed=index % 3), prompt)
        obj = result.objects[0]
        assert (result.colour, result.shape, result.motion) == (1.0, 1.0, 1.0), (prompt, obj)
        assert result.identity == 1.0 and obj.shape_iou > 0.85, (prompt, obj)
    # uint8 frames work the same
    frames = clip(prompts[0])
    assert metrics.evaluate_clip((frames * 255).round().astype(np.uint8), prompts[0]).shape == 1.0
    with pytest.raises(ValueError, match="0..1"):
        metrics.evaluate_clip(frames * 2 - 1, prompts[0])
    with pytest.raises(ValueError, match="not a sentence of this world"):
        metrics.evaluate_clip(frames, "a corgi surfing a wave")


@pytest.mark.parametrize("wrong, attribute", [
    ("a green square moves left on a black background", "colour"),
    ("a red circle moves left on a black background", "shape"),
    ("a red diamond moves left on a black background", "shape"),
    ("a red square moves right on a black background", "motion"),
    ("a red square moves up on a black background", "motion"),
    ("a red square bounces on a black background", "motion"),
    ("a red square grows on a black background", "motion"),
])
def test_a_render_of_another_caption_fails_that_attribute(wrong, attribute):
    named = "a red square moves left on a black background"
    result = metrics.evaluate_clip(clip(wrong, seed=1), named)
    scores = {"colour": result.colour, "shape": result.shape, "motion": result.motion}
    assert scores[attribute] == 0.0, (wrong, result.objects[0])
    if attribute != "colour":  # the other attributes are still recognised
        assert all(v == 1.0 for k, v in scores.items() if k != attribute), (wrong, result.objects[0])


def test_motion_classifier_names_each_world_motion():
    for motion in world.MOTIONS:
        caption = f"a white cross {motion} on a gray checkered background"
        for seed in range(2):
            obj = metrics.evaluate_clip(clip(caption, seed=seed), caption).objects[0]
            assert obj.predicted_motion == motion, (motion, seed, obj.motion_features)


def test_random_noise_fails_adherence():
    prompt = world.heldout_prompts(1, seed=2)[0]
    noise = np.random.default_rng(0).random((FRAMES, SIZE, SIZE, 3), dtype=np.float32)
    result = metrics.evaluate_clip(noise, prompt)
    assert (result.colour, result.shape, result.motion) == (0.0, 0.0, 0.0)
    assert result.identity < 0.3


def test_blur_lowers_the_sharpness_ratio_and_shuffling_raises_flicker():
    for prompt in world.heldout_prompts(3, seed=1):
        frames = clip(prompt)
        blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in frames])
        sharp, soft = metrics.edge_energy(frames), metrics.edge_energy(blurred)
        assert soft / sharp < 0.6
        slight = np.stack([cv2.GaussianBlur(f, (0, 0), 0.6) for f in frames])
        assert soft / sharp < metrics.edge_energy(slight) / sharp < 1.0  # monotone in the blur
        # grain on the blurred clip inflates the plain edge energy; the denoised one barely moves
        grainy = np.clip(blurred + np.random.default_rng(1).normal(0, 0.05, blurred.shape), 0, 1).astype(np.float32)
        plain_rise = metrics.edge_energy(grainy) / soft
        denoised_rise = metrics.edge_energy(grainy, denoise=True) / metrics.edge_energy(blurred, denoise=True)
        assert plain_rise > 1.25 and denoised_rise < 1.15 and denoised_rise < plain_rise
        assert metrics.edge_energy(grainy, denoise=True) < 0.6 * metrics.edge_energy(frames, denoise=True)
        # frame-to-frame change saturates once an object jumps further than its size between frames (fast bounces
        # over few frames), so the shuffled clips are longer
        frames = clip(prompt, num_frames=41)
        shuffled = frames[np.random.default_rng(0).permutation(len(frames))]
        assert metrics.flicker(shuffled) > 1.5 * metrics.flicker(frames)
    assert metrics.flicker(frames[:1]) == 0.0


def test_edge_sharpness_measures_blur_not_the_number_of_edges():
    for prompt in world.heldout_prompts(2, seed=4):
        frames = clip(prompt, size=128)
        sharp = metrics.edge_sharpness(frames)
        blurred = [np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in frames]) for sigma in (0.6, 1.5)]
        assert metrics.edge_sharpness(blurred[1]) / sharp < metrics.edge_sharpness(blurred[0]) / sharp < 0.85
        assert metrics.edge_sharpness(blurred[1]) / sharp < 0.5
        half = frames.copy()
        half[::2] = frames[0, 0, 0]  # the object (and any texture) gone from every other frame
        assert metrics.edge_sharpness(half) == pytest.approx(sharp, rel=0.05)
        assert metrics.edge_energy(half) / metrics.edge_energy(frames) < 0.6  # the edge energy halves
    assert metrics.edge_sharpness(np.zeros((3, 16, 16, 3), np.float32)) == 0.0


def test_identity_drops_when_the_object_vanishes_or_changes_size():
    prompt = "a blue circle moves right on a dark green background"
    frames = clip(prompt)
    gone = frames.copy()
    gone[::2] = frames[0, 0, 0]  # every other frame only background
    assert metrics.evaluate_clip(gone, prompt).identity == pytest.approx(8 / 17)
    resized = frames.copy()
    other = clip("a blue circle grows on a dark green background", seed=3)
    resized[5:9] = other[-4:]  # a much larger blue circle for four frames
    assert metrics.evaluate_clip(resized, prompt).identity == pytest.approx(13 / 17)


def test_model_spec_parsing(tmp_path):
    spec = ev.parse_model_spec(f"teacher={tmp_path}:sampler=teacher,steps=16,guidance=4.5")
    assert (spec.name, spec.path, spec.sampler, spec.steps, spec.guidance) == ("teacher", str(tmp_path), "teacher",
                                                                               16, 4.5)
    assert ev.parse_model_spec(f"a={tmp_path}").steps is None
    assert ev.parse_model_spec("gt=ground-truth").is_ground_truth
    assert ev.evenly_spaced_timesteps(4) == [1000, 750, 500, 250] and ev.evenly_spaced_timesteps(1) == [1000]
    for bad, message in [(f"{tmp_path}", "NAME=PATH"), (f"a={tmp_path}:colour=red", "unknown option"),
                         (f"a={tmp_path}:steps=two", "not a int"), (f"a={tmp_path}:steps=0", ">= 1"),
                         (f"a={tmp_path}/nope", "not a folder"), (f"a={tmp_path}:sampler=magic", "sampler"),
                         ("gt=ground-truth:steps=2", "no options"),
                         (f"vae={tmp_path}:sampler=round-trip,steps=2", "runs no transformer")]:
        with pytest.raises(ValueError, match=message):
            ev.parse_model_spec(bad)


def test_background_is_recognised():
    prompt = "a yellow cross grows on a gray striped background"
    assert metrics.evaluate_clip(clip(prompt), prompt).background == 1.0
    other = "a yellow cross grows on a dark green striped background"
    assert metrics.evaluate_clip(clip(other), prompt).background == 0.0
    assert metrics.dominant_background(clip(other)) == "dark green"
    # mostly object colour (a huge white square), or nothing near any world colour: no background
    assert metrics.dominant_background(np.full((5, 32, 32, 3), 0.96, np.float32)) is None
    assert metrics.dominant_background(np.full((5, 32, 32, 3), [0.5, 0.9, 0.9], np.float32)) is None


def rounded(value):
    """Floats in nested dicts / lists to 10 significant digits."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(f"{value:.10g}")
    return value


def test_scoring_in_worker_processes_matches_inline():
    prompts = world.heldout_prompts(2, seed=3)
    frames = [clip(p, seed=i, num_frames=9, size=32) for i, p in enumerate(prompts)]
    inline = ev.ClipScorer(0, 0.3)
    expected = [inline.submit(f, p).result() for f, p in zip(frames, prompts)]
    pool = ev.ClipScorer(1, 0.3)
    try:
        futures = [pool.submit(f, p) for f, p in zip(frames, prompts)]
        # equal up to the order of float summation, which may follow the arrays' memory alignment
        assert rounded([f.result() for f in futures]) == rounded(expected)
    finally:
        pool.close()
    assert inline.submit(frames[0], "no caption of this world").exception() is not None


def test_device_and_sizes_are_checked():
    assert ev.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ev.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device"):
        ev.resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            ev.resolve_device("cuda")
    ev.check_video_size(ev.VideoSize(81, 128, 128))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ev.check_video_size(ev.VideoSize(80, 128, 128))


def test_cli_quality_run_speed_run_table_and_resume(tmp_path, tiny_folder, one_thread):
    model = tiny_folder
    out, table = tmp_path / "results.json", tmp_path / "table.md"
    models = ["--model", "gt=ground-truth", "--model", f"student={model}:steps=2",
              "--model", f"again={model}:steps=2", "--model", f"teacher={model}:sampler=teacher,steps=2,guidance=2"]
    argv = [*models, "--seeds", "0", "1", *TINY, "--device", "auto", "--workers", "0", "--out", str(out),
            "--markdown", str(table), "--compare", "gt:student"]
    handler = signal.getsignal(signal.SIGTERM)
    ev.main([*argv, "--save-videos", str(tmp_path / "videos")])
    assert signal.getsignal(signal.SIGTERM) is handler  # its SIGTERM exit is the run's, not the caller's for good
    results = json.loads(out.read_text())
    assert list(results["models"]) == ["gt", "student", "again", "teacher"]
    assert results["settings"]["mode"] == "quality" and results["settings"]["device_kind"] == "cpu"
    gt = results["models"]["gt"]["summary"]
    for key in ev.SUMMARY_KEYS:
        assert gt[key]["mean"] == pytest.approx(1.0) and len(gt[key]["per_seed"]) == 2
    student = results["models"]["student"]
    assert student["spec"]["block_timesteps"] == pytest.approx([1000.0, 833.333], rel=1e-5)  # [1000, 500], shift 5
    assert len(student["clips"]) == 2 and student["clips"][0]["num_frames"] == 5 and student["fps"] > 0
    # an untrained model draws no world: no object fully right, background wrong
    assert student["summary"]["joint"]["mean"] == 0.0 and student["summary"]["background"]["mean"] == 0.0
    # same seeds, same clips, same numbers
    strip = lambda clips: [{k: v for k, v in c.items() if k != "seconds"} for c in clips]  # noqa: E731
    assert strip(results["models"]["again"]["clips"]) == strip(student["clips"])
    assert results["models"]["teacher"]["spec"]["steps"] == 2
    lines = table.read_text().splitlines()
    assert any(line.startswith("| student |") for line in lines)
    assert any(line.startswith("| gt | 1.000 ± 0.000 | 1.000") for line in lines)
    assert len(list((tmp_path / "videos").glob("*/*.mp4"))) == 8
    # the paired sharpness test: ground truth against the untrained model's noise-free blur, clip by clip
    sharpness = {name: [c["edge_sharpness"] for c in results["models"][name]["clips"]] for name in ("gt", "student")}
    higher = sum(a > b for a, b in zip(sharpness["gt"], sharpness["student"]))
    assert f"- paired test, edge sharpness: gt vs student over the same 2 (prompt, seed) clips" in table.read_text()
    assert f"gt higher in {higher} of 2; one-sided sign-flip permutation p = " in table.read_text()
    compared = ev.paired_comparison(results, "gt", "student")
    differences = np.subtract(sharpness["gt"], sharpness["student"])
    assert compared["p_one_sided"] == metrics.paired_sign_flip_p(differences)
    with pytest.raises(SystemExit, match="no model 'nope'"):
        ev.main(["--tabulate", "--out", str(out), "--compare", "gt:nope"])
    with pytest.raises(SystemExit, match="FIRST:SECOND"):
        ev.main(["--tabulate", "--out", str(out), "--compare", "gt"])

    # speed on its own, then merged into the quality table as a column
    speed = tmp_path / "speed.json"
    ev.main(["--model", f"student={model}:steps=2", *TINY, "--seeds", "0", "--speed-only", "--speed-clips", "1",
             "--warmup", "1", "--warmup-frames", "1", "--threads", "1", "--out", str(speed)])
    timed = json.loads(speed.read_text())
    assert timed["settings"]["mode"] == "speed" and len(timed["models"]["student"]["clip_seconds"]) == 1
    assert "summary" not in timed["models"]["student"] and timed["models"]["student"]["fps"] > 0
    merged = tmp_path / "merged.md"
    ev.main(["--tabulate", "--out", str(out), "--speed-from", str(speed), "--markdown", str(merged)])
    rows = {line.split(" | ")[0]: line for line in merged.read_text().splitlines() if line.startswith("| ")}
    assert "frames/s (speed run)" in rows["| model"]
    assert rows["| student"].endswith(f" | {timed['models']['student']['fps']:.2f} |")
    assert rows["| gt"].endswith(" | – |")  # not timed in the speed run
    with pytest.raises(SystemExit, match="--speed-only run"):
        ev.main(["--tabulate", "--out", str(out), "--speed-from", str(out)])

    # --resume keeps what is there (the timings too) and runs only what is new
    ev.main([*argv[:4], "--model", f"one_step={model}:steps=1", *argv[8:], "--resume"])
    again = json.loads(out.read_text())
    assert list(again["models"]) == ["gt", "student", "one_step", "again", "teacher"]  # the others stay, last
    assert again["models"]["student"]["seconds"] == student["seconds"]
    assert again["models"]["one_step"]["spec"]["block_timesteps"] == [1000.0]
    with pytest.raises(SystemExit, match="other settings .*seeds"):
        ev.main([*argv[:4], "--seeds", "0", *TINY, "--out", str(out), "--resume"])


def test_round_trip_row_is_the_world_through_the_pipelines_vae(tmp_path, one_thread):
    """The ``round-trip`` sampler encodes the world's render with the pipeline's VAE and decodes it: the demo VAE keeps
    the object's background, colour and motion and blurs its edges, so its row sits below ground truth's sharpness."""
    from diffusers import AutoencoderKLWan

    from oneforcing.__main__ import DEMO_MODEL_DIR

    out = tmp_path / "results.json"
    ev.main(["--model", "gt=ground-truth", "--model", f"vae={DEMO_MODEL_DIR}:sampler=round-trip", "--num-frames", "9",
             "--height", "128", "--width", "128", "--num-prompts", "1", "--seeds", "0", "--warmup", "0",
             "--device", "cpu", "--workers", "0", "--out", str(out)])
    vae_row = json.loads(out.read_text())["models"]["vae"]
    assert vae_row["spec"]["sampler"] == "round-trip"
    assert not {"steps", "guidance", "shift", "parameters"} & set(vae_row["spec"])  # no transformer ran
    (clip_scores,) = vae_row["clips"]
    assert (clip_scores["background"], clip_scores["colour"]) == (1.0, 1.0)
    assert 0.3 < vae_row["summary"]["edge_sharpness"]["mean"] < 0.95

    prompt = ev.prompt_list("heldout", 1)[0]
    vae = AutoencoderKLWan.from_pretrained(DEMO_MODEL_DIR / "vae").eval()
    with torch.no_grad():
        video = ev.ground_truth_video(prompt, 0, ev.VideoSize(9, 128, 128))[None]
        decoded = vae.decode(vae.encode(video).latent_dist.mode()).sample[0]
    assert clip_scores["edge_sharpness"] == pytest.approx(metrics.edge_sharpness(metrics.world_frames(decoded)),
                                                          rel=1e-4)


def test_resume_reruns_a_model_retrained_in_place(tmp_path, tiny_folder, one_thread, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    out = tmp_path / "results.json"
    argv = ["--model", f"student={model}:steps=1", "--seeds", "0", *TINY, "--device", "cpu", "--workers", "0",
            "--out", str(out), "--resume"]
    ev.main(argv)
    first = json.loads(out.read_text())["models"]["student"]
    capsys.readouterr()
    ev.main(argv)  # nothing changed: kept
    assert "[student] kept from" in capsys.readouterr().out
    weights = next((model / "transformer").glob("*.safetensors"))
    save_file({k: v + 0.5 for k, v in load_file(weights).items()}, weights)  # same path, new weights
    ev.main(argv)
    assert "[student] kept from" not in capsys.readouterr().out
    again = json.loads(out.read_text())["models"]["student"]
    assert again["request"]["weights"] != first["request"]["weights"]
    assert again["request"]["path"] == first["request"]["path"]


def test_resume_reruns_a_transformer_file_rewritten_in_place(tmp_path, tiny_folder, one_thread, capsys):
    """A transformer override given as one checkpoint file is part of the model's fingerprint too."""
    from oneforcing.pipelines.loading import export_reference_checkpoint, load_transformer

    transformer = load_transformer(tiny_folder / "transformer")
    checkpoint = export_reference_checkpoint(transformer, tmp_path / "student.pt")
    out = tmp_path / "results.json"
    argv = ["--model", f"student={tiny_folder}:transformer={checkpoint},steps=1", "--seeds", "0", *TINY,
            "--device", "cpu", "--workers", "0", "--out", str(out), "--resume"]
    ev.main(argv)
    first = json.loads(out.read_text())["models"]["student"]
    capsys.readouterr()
    ev.main(argv)  # nothing changed: kept
    assert "[student] kept from" in capsys.readouterr().out
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.5)
    export_reference_checkpoint(transformer, checkpoint)  # same file, new weights
    ev.main(argv)
    assert "[student] kept from" not in capsys.readouterr().out
    assert json.loads(out.read_text())["models"]["student"]["request"]["weights"] != first["request"]["weights"]


def test_results_are_written_after_every_model(tmp_path, tiny_folder, one_thread):
    broken = tmp_path / "broken_transformer"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "CausalWanTransformer3DModel", "num_layers": 1}))
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit, match="broken_transformer: cannot load the transformer"):
        ev.main(["--model", "gt=ground-truth", "--model", f"student={tiny_folder}:steps=1",
                 "--model", f"broken={tiny_folder}:transformer={broken}", "--seeds", "0", *TINY, "--out", str(out)])
    assert list(json.loads(out.read_text())["models"]) == ["gt", "student"]
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))


def test_bad_arguments_are_refused(tmp_path, tiny_folder):
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit, match="multiples of 16"):
        ev.main(["--model", "gt=ground-truth", "--height", "60", "--num-frames", "5", "--out", str(out)])
    with pytest.raises(SystemExit, match="1 \\+ 4k"):
        ev.main(["--model", "gt=ground-truth", "--warmup-frames", "4", "--out", str(out)])
    with pytest.raises(SystemExit, match="names must differ"):
        ev.main(["--model", "a=ground-truth", "--model", "a=ground-truth", "--out", str(out)])
    with pytest.raises(SystemExit, match="at least one --model"):
        ev.main(["--out", str(out)])
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(["--tabulate", "--out", str(out)])
    with pytest.raises(SystemExit, match="transformer=.* does not exist"):
        ev.main(["--model", f"a={tiny_folder}:transformer={tmp_path}/nope", "--out", str(out)])
    with pytest.raises(SystemExit, match="model_index.json"):
        ev.main(["--model", f"a={tmp_path}", "--num-frames", "5", "--height", "64", "--width", "64",
                 "--num-prompts", "1", "--seeds", "0", "--out", str(out)])


def test_prompt_list_gives_seen_or_heldout_combinations(tmp_path):
    seen, heldout = ev.prompt_list("seen", 6, seed=1), ev.prompt_list("heldout", 6, seed=1)
    assert {world.caption_split(p) for p in seen} == {"train"}
    assert {world.caption_split(p) for p in heldout} == {"heldout"}
    assert heldout == world.heldout_prompts(6, seed=1)
    with pytest.raises(ValueError, match="'heldout', 'seen' or a text file"):
        ev.prompt_list(str(tmp_path / "missing.txt"), 2)


def test_paired_sign_flip_test():
    # every one of 10 pairs favours the first: only the all-positive sign pattern reaches the observed mean
    assert metrics.paired_sign_flip_p(np.linspace(0.1, 1.0, 10)) == pytest.approx(1 / 1024)
    assert metrics.paired_sign_flip_p(-np.linspace(0.1, 1.0, 10)) == pytest.approx(1.0)
    assert metrics.paired_sign_flip_p([0.0, 0.0, 0.0]) == 1.0  # no difference at all is no evidence
    symmetric = np.array([1.0, -1.0, 2.0, -2.0, 0.5, -0.5])
    assert 0.5 <= metrics.paired_sign_flip_p(symmetric) < 0.7
    rng = np.random.default_rng(0)
    shifted = rng.normal(0.5, 1.0, size=60)  # a real shift, seen through noise: the Monte Carlo branch
    assert metrics.paired_sign_flip_p(shifted) < 0.01
    assert metrics.paired_sign_flip_p(rng.normal(0.0, 1.0, size=60)) > 0.05
    # the Monte Carlo branch agrees with the exact count where both apply
    twelve = rng.normal(0.3, 1.0, size=12)
    exact = metrics.paired_sign_flip_p(twelve)
    assert 0.01 < exact < 0.9 and exact * 4096 == pytest.approx(round(exact * 4096))  # a count of the 4096 patterns
    assert metrics.paired_sign_flip_p(twelve, exact_up_to=0) == pytest.approx(exact, abs=0.005)
    for bad in ([], [1.0, float("nan")], [[1.0]]):
        with pytest.raises(ValueError, match="finite differences"):
            metrics.paired_sign_flip_p(bad)
