"""The command line writes a playable mp4 from a saved pipeline folder, and explains bad arguments."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline

from oneforcing.__main__ import _load_pipeline, _parser, main
from oneforcing.pipelines.fp8 import is_fp8_stored
from oneforcing.pipelines.video_io import read_video_frames


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    make_tiny_pipeline().save_pretrained(folder)
    return folder


def test_generate_writes_mp4(tmp_path, model_dir, capsys):
    out = tmp_path / "clip.mp4"
    main(["generate", "--prompt", "a red circle moves left", "--out", str(out), "--model", str(model_dir),
          "--num-frames", "9", "--height", "32", "--width", "48", "--frames-per-block", "3", "--seed", "1"])
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 9
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (48, 32)
    assert "wrote 9 frames" in capsys.readouterr().out


def test_transformer_override_from_single_file(tmp_path, model_dir, capsys):
    from oneforcing.pipelines.loading import export_reference_checkpoint

    transformer = make_tiny_pipeline(seed=4).transformer
    ckpt = export_reference_checkpoint(transformer.state_dict(), tmp_path / "of.pt", config=transformer.config)
    bare = tmp_path / "bare.pt"  # a reference checkpoint from elsewhere: no recorded config
    torch.save({"generator_ema": torch.load(ckpt, weights_only=True)["generator_ema"]}, bare)
    out = tmp_path / "clip.mp4"
    common = ["generate", "--prompt", "a cat", "--out", str(out), "--model", str(model_dir), "--num-frames", "5",
              "--height", "32", "--width", "32"]
    assert main([*common, "--transformer", str(ckpt)]) == 0 and _frames(out) == 5
    # heads cannot be read from a 64-wide checkpoint that records none: the error must say so, not load garbage
    assert main([*common, "--transformer", str(bare)]) == 1
    assert "--num-attention-heads" in capsys.readouterr().err
    assert main([*common, "--transformer", str(bare), "--num-attention-heads", "2"]) == 0


def test_fp8_weight_storage(tmp_path, model_dir):
    from oneforcing.pipelines.loading import export_reference_checkpoint

    transformer = make_tiny_pipeline(seed=4).transformer
    ckpt = export_reference_checkpoint(transformer.state_dict(), tmp_path / "of.pt", config=transformer.config)
    out = tmp_path / "clip.mp4"
    common = ["generate", "--prompt", "a cat", "--out", str(out), "--model", str(model_dir), "--num-frames", "5",
              "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp8_e4m3fn"]
    for extra in ([], ["--transformer", str(ckpt)]):
        pipe = _load_pipeline(_parser().parse_args([*common, *extra]))
        assert is_fp8_stored(pipe.transformer.blocks[0].attn1.to_q)
        assert is_fp8_stored(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q)
        assert pipe.transformer.proj_out.weight.dtype == torch.float32  # computed in the CPU's default dtype
        assert main([*common, *extra]) == 0 and _frames(out) == 5


def test_bad_arguments(tmp_path, model_dir):
    with pytest.raises(SystemExit, match="not a folder"):
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--model", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=".mp4"):
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.gif"), "--model", str(model_dir),
              "--num-frames", "5", "--height", "32", "--width", "32"])
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--model", str(model_dir),
                 "--num-frames", "5", "--height", "30", "--width", "32"]) == 1


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "oneforcing", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--frames-per-block" in result.stdout


def _frames(path):
    return len(read_video_frames(path))


BASE = ["--height", "32", "--width", "32", "--frames-per-block", "1", "--seed", "2"]


def test_prompt_switches_image_and_video(tmp_path, model_dir, capsys):
    import json

    import numpy as np
    import PIL.Image

    from oneforcing.pipelines.video_io import export_to_mp4

    out = tmp_path / "switch.mp4"
    main(["generate", "--prompt", "0:a red circle", "--prompt", "6:a cat on the beach", "--out", str(out),
          "--model", str(model_dir), "--num-frames", "13", *BASE])
    text = capsys.readouterr().out
    assert "frame 9: a cat on the beach" in text and "wrote 13 frames" in text  # 6 rounds up to latent frame 3
    assert _frames(out) == 13
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps([{"start": 0, "end": 6, "prompt": "a red circle"},
                                    {"start": 6, "prompt": "a cat on the beach"}]))
    again = tmp_path / "again.mp4"
    main(["generate", "--prompt-schedule", str(schedule), "--out", str(again), "--model", str(model_dir),
          "--num-frames", "13", *BASE])
    assert _frames(again) == 13
    image = tmp_path / "start.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    from_image = tmp_path / "i2v.mp4"
    main(["generate", "--prompt", "a cat", "--image", str(image), "--out", str(from_image), "--model",
          str(model_dir), "--num-frames", "5", *BASE])
    assert _frames(from_image) == 5
    clip = export_to_mp4(np.random.default_rng(1).random((5, 32, 32, 3), dtype=np.float32), tmp_path / "clip.mp4")
    extended = tmp_path / "extended.mp4"
    main(["generate", "--prompt", "a cat", "--video", str(clip), "--out", str(extended), "--model", str(model_dir),
          "--num-frames", "13", *BASE])
    assert _frames(extended) == 13


def test_interrupted_endless_run_leaves_a_playable_file(tmp_path, model_dir, capsys):
    from oneforcing.__main__ import _parser, generate

    out = tmp_path / "endless.mp4"
    args = _parser().parse_args(["generate", "--prompt", "a cat", "--out", str(out), "--model", str(model_dir),
                                 "--num-frames", "endless", "--window-frames", "2", "--sink-frames", "1", *BASE])

    def ctrl_c(written):
        if written >= 13:
            raise KeyboardInterrupt

    generate(args, on_block=ctrl_c)
    assert args.interrupted and "interrupted" in capsys.readouterr().out
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened() and _frames(out) == 13
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (32, 32)


def test_bad_schedules_and_context_arguments(tmp_path, model_dir):
    out = str(tmp_path / "a.mp4")
    common = ["--out", out, "--model", str(model_dir), "--num-frames", "9", *BASE]
    with pytest.raises(SystemExit, match="needs its first frame"):
        main(["generate", "--prompt", "0:a cat", "--prompt", "a dog", *common])
    with pytest.raises(SystemExit, match="past the end"):
        main(["generate", "--prompt", "0:a cat", "--prompt", "9:a dog", *common])
    with pytest.raises(SystemExit, match="give --prompt"):
        main(["generate", *common])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--prompt-schedule", str(tmp_path / "none.json"), *common])
    with pytest.raises(SystemExit, match="cannot read it as an image"):
        main(["generate", "--prompt", "a cat", "--image", str(tmp_path / "none.png"), *common])
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "a cat", "--out", out, "--num-frames", "lots"])


@pytest.mark.parametrize("independent,switch_frame", [(False, 9), (True, 13)])
def test_independent_first_frame_layout(tmp_path, model_dir, capsys, independent, switch_frame):
    """Blocks [1, 3, 1] instead of [3, 2]: a switch asked at frame 3 lands on the block starting at latent frame 4."""
    out = tmp_path / "clip.mp4"
    main(["generate", "--prompt", "0:a red circle", "--prompt", "3:a cat", "--out", str(out), "--model",
          str(model_dir), "--num-frames", "17", "--height", "32", "--width", "32", "--frames-per-block", "3"]
         + (["--independent-first-frame"] if independent else []))
    printed = capsys.readouterr().out
    assert f"frame {switch_frame}: a cat" in printed and "wrote 17 frames" in printed
    assert int(cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT)) == 17


def test_lora_option_loads_stacks_and_refuses(tmp_path, model_dir, capsys):
    """--lora PATH[:STRENGTH], repeatable: the pipeline runs as its weights patched by hand with sum(s * B @ A);
    strength 0 writes the base video exactly; a missing file or a LoRA of another model ends with one error line."""
    from safetensors.torch import save_file
    from test_lora import ARGS, in_layout, make_adapter, patched_by_hand

    from oneforcing.__main__ import _load_pipeline, _parser

    base_model = make_tiny_pipeline().transformer
    style, subject = make_adapter(base_model, seed=1), make_adapter(base_model, seed=2)
    files = [tmp_path / "style.safetensors", tmp_path / "sub:ject.safetensors"]  # a colon inside the path is kept
    save_file(in_layout(style, "wan"), str(files[0]))
    save_file(in_layout(subject, "comfyui"), str(files[1]))
    args = _parser().parse_args(["generate", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--model",
                                 str(model_dir), "--device", "cpu", "--lora", f"{files[0]}:0.5", "--lora", str(files[1])])
    pipe = _load_pipeline(args)
    latents = pipe("a cat", generator=torch.Generator().manual_seed(0), **ARGS).frames
    expected = patched_by_hand([(style, 0.5), (subject, 1.0)])("a cat", generator=torch.Generator().manual_seed(0),
                                                                **ARGS).frames
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)

    common = ["generate", "--prompt", "a cat", "--model", str(model_dir), "--num-frames", "5", *BASE]
    assert main([*common, "--out", str(tmp_path / "base.mp4")]) == 0
    assert main([*common, "--out", str(tmp_path / "zero.mp4"), "--lora", f"{files[0]}:0"]) == 0
    assert main([*common, "--out", str(tmp_path / "one.mp4"), "--lora", str(files[0])]) == 0
    base, zero, one = (read_video_frames(tmp_path / f"{name}.mp4") for name in ("base", "zero", "one"))
    assert np.array_equal(zero, base) and not np.array_equal(one, base)

    with pytest.raises(SystemExit, match="none.safetensors does not exist"):
        main([*common, "--out", str(tmp_path / "b.mp4"), "--lora", str(tmp_path / "none.safetensors:0.8")])
    pickled = tmp_path / "style.pt"
    pickled.write_bytes(files[0].read_bytes())
    with pytest.raises(SystemExit, match="only .safetensors LoRA files are read"):
        main([*common, "--out", str(tmp_path / "b.mp4"), "--lora", str(pickled)])
    other = tmp_path / "other.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 99),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4)}, str(other))
    with pytest.raises(SystemExit, match="blocks.0.attn1.to_q.lora_A.weight"):
        main([*common, "--out", str(tmp_path / "b.mp4"), "--lora", str(other)])
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "b.mp4"), "--lora", f"{files[0]}:nan"])
    assert "finite LoRA strength" in capsys.readouterr().err

