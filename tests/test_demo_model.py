"""The shipped demo model (models/oneforcing-demo): loads, generates on the CPU, and follows its captions.

Two adherence checks: on short clips, the background colour a caption names must be the nearest world background to
the clip's median colour (a random-weight model of the same architecture fails it, checked here too); on full-length
clips of held-out (colour, shape, motion) combinations, the evaluation's own metrics must find the caption's colour
and motion, and some of its shapes. The CLI writes a playable mp4 with no --model. The models bundled for retraining
(models/oneforcing-demo-training: the teacher and the chunk-wise student) are checked the same way, each sampled as
the evaluation samples its row.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import DEMO_CHUNKWISE_DIR, DEMO_TEACHER_DIR

from oneforcing import CausalWanTransformer3DModel, OneForcingPipeline
from oneforcing.__main__ import DEMO_MODEL_DIR, main
from oneforcing.training import evaluate, metrics, world

PROMPTS = (  # training-split combinations, three different backgrounds
    "a yellow circle moves right on a black background",
    "a white square moves up on a dark blue background",
    "a green triangle moves down on a dark green background",
)
NUM_FRAMES = 9  # 3 latent frames: a short clip keeps the test fast; the model is causal, so it is a true prefix

pytestmark = pytest.mark.skipif(not DEMO_MODEL_DIR.is_dir(), reason="the demo model is not in this checkout")


@pytest.fixture(scope="module")
def demo_pipe():
    return OneForcingPipeline.from_pretrained(DEMO_MODEL_DIR)


def nearest_background(video: np.ndarray) -> str:
    """The world background closest to the clip's per-channel median colour (video [T, H, W, 3] in 0..1)."""
    median = np.median(video.reshape(-1, 3), axis=0)
    return min(world.BACKGROUNDS, key=lambda name: np.linalg.norm(median - np.array(world.BACKGROUNDS[name])))


def backgrounds_followed(pipe) -> int:
    hits = 0
    for i, prompt in enumerate(PROMPTS):
        video = pipe(prompt, num_frames=NUM_FRAMES, height=128, width=128, output_type="np",
                     generator=torch.Generator().manual_seed(i)).frames[0]
        assert video.shape == (NUM_FRAMES, 128, 128, 3)
        hits += nearest_background(video) == world.parse_caption(prompt).background
    return hits


def held_out_scores(generate, count: int) -> list[tuple[float, float, float]]:
    """(colour, motion, shape) of each of the first ``count`` held-out prompts, prompt i generated with seed i by
    ``generate(prompt, seed)`` -> frames [81, 128, 128, 3] in 0..1, scored as the README's evaluation scores them."""
    scores = []
    for seed, prompt in enumerate(world.heldout_prompts(count)):
        video = generate(prompt, seed)
        assert video.shape == (81, 128, 128, 3)
        clip = metrics.evaluate_clip(video, prompt)
        scores.append((clip.colour, clip.motion, clip.shape))
    return scores


def test_demo_model_records_its_training_settings_and_size_limit(demo_pipe):
    assert demo_pipe.config.default_video_size == {"num_frames": 81, "height": 128, "width": 128}
    assert demo_pipe.default_max_sequence_length == 32
    assert demo_pipe.transformer.config.frames_per_block == 1
    total = sum(f.stat().st_size for f in Path(DEMO_MODEL_DIR).rglob("*") if f.is_file())
    assert total <= 25e6


def test_demo_model_follows_the_background_and_random_weights_do_not(demo_pipe):
    assert backgrounds_followed(demo_pipe) == len(PROMPTS)
    config = dict(demo_pipe.transformer.config)
    torch.manual_seed(0)
    random_transformer = CausalWanTransformer3DModel.from_config(config)
    random_pipe = OneForcingPipeline(
        demo_pipe.tokenizer, demo_pipe.text_encoder, random_transformer, demo_pipe.vae, demo_pipe.scheduler,
        default_video_size=demo_pipe.config.default_video_size, max_sequence_length=32,
    )
    assert backgrounds_followed(random_pipe) < len(PROMPTS)


def test_readme_main_command_writes_a_playable_mp4_with_the_demo_default(tmp_path):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--prompt", PROMPTS[0], "--out", str(out), "--num-frames", "13"]) == 0
    capture = cv2.VideoCapture(str(out))
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = capture.read()
    capture.release()
    assert ok and frames == 13 and frame.shape == (128, 128, 3)


def test_demo_model_draws_the_colour_motion_and_some_shapes_of_held_out_prompts(demo_pipe):
    """Eight held-out combinations (never in training), one seed, the model's full 81 frames, scored by
    training/metrics.py as the README's evaluation scores them. The thresholds sit below what the shipped model
    reaches (README, Evaluation) and above the session-19 student, which drew four of these shapes, and the
    session-12 one, which lost most of the motions and drew no shape."""
    def generate(prompt: str, seed: int) -> np.ndarray:
        return demo_pipe(prompt, output_type="np", generator=torch.Generator().manual_seed(seed)).frames[0]

    scores = held_out_scores(generate, count=8)
    colour, motion, shape = np.sum(scores, axis=0)
    assert colour >= 7 and motion >= 6 and shape >= 5, scores


def evaluation_row_scores(options: str, count: int) -> list[tuple[float, float, float]]:
    """:func:`held_out_scores` of the evaluation row ``NAME=<demo>:<options>`` (``training/evaluate.py``'s
    ``--model`` syntax), sampled on the CPU as the evaluation samples it."""
    spec = evaluate.parse_model_spec(f"row={DEMO_MODEL_DIR}:{options}")
    pipe = evaluate.load_pipeline(spec, "cpu", torch.float32)
    generate = evaluate.pipeline_generator(pipe, spec, pipe.default_max_sequence_length)
    size = evaluate.VideoSize(**pipe.config.default_video_size)
    return held_out_scores(lambda prompt, seed: generate(prompt, seed, size), count)


@pytest.mark.skipif(not DEMO_TEACHER_DIR.is_dir(), reason="the bundled teacher is not in this checkout")
def test_bundled_teacher_draws_the_colour_motion_and_shape_of_held_out_prompts():
    """The multi-step teacher bundled for distilling the demo's students, with the demo's tokenizer, text encoder and
    VAE: 32 Euler steps with guidance, as ``training/evaluate.py``'s teacher rows. Four held-out combinations, one seed
    each. It draws every colour, nearly every motion and most shapes (README, Evaluation), so three shapes of four
    are asked. A teacher that is missing, damaged or sampled wrongly loses the colours."""
    scores = evaluation_row_scores(f"sampler=teacher,transformer={DEMO_TEACHER_DIR}", count=4)
    colour, motion, shape = np.sum(scores, axis=0)
    assert colour == 4 and motion >= 3 and shape >= 3, scores


@pytest.mark.skipif(not DEMO_CHUNKWISE_DIR.is_dir(), reason="the bundled chunk-wise student is not in this checkout")
def test_bundled_chunkwise_student_draws_the_colour_motion_and_shapes_of_held_out_prompts():
    """The chunk-wise One-Forcing student (3 latent frames a block), one step per block as the evaluation's
    ``chunkwise_1step`` row. Eight held-out combinations, one seed each: it draws every colour and motion and most
    shapes (README, Evaluation). Its config must give the block size its row samples with."""
    assert CausalWanTransformer3DModel.load_config(DEMO_CHUNKWISE_DIR)["frames_per_block"] == 3
    scores = evaluation_row_scores(f"transformer={DEMO_CHUNKWISE_DIR},steps=1,frames_per_block=3", count=8)
    colour, motion, shape = np.sum(scores, axis=0)
    assert colour >= 7 and motion >= 6 and shape >= 3, scores
