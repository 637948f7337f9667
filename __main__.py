"""Command line: ``python -m oneforcing generate --prompt "..." --out clip.mp4`` (also the ``oneforcing`` script).

The video is written to the mp4 block by block as it is generated, under a temporary name that replaces ``--out``
once the file is finished: an interrupted run (Ctrl-C, SIGTERM) leaves a playable file of what was made so far, a
killed one leaves ``--out`` as it was, and memory stays flat however long the video. ``--num-frames endless`` streams
until interrupted (with a rolling KV cache). Prompts can switch during the video (``--prompt "0:a cat" --prompt "40:a dog"``
or ``--prompt-schedule schedule.json``), and a video can start from an image (``--image``) or continue a clip
(``--video``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from . import DEMO_MODEL_DIR

from .pipelines.presets import DTYPE_CHOICES, TIMESTEP_PRESETS, cli_name, resolve_dtype, storage_dtype, timestep_preset


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneforcing", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="text to video, written to an mp4 as it is generated")
    gen.add_argument("--prompt", action="append", default=None,
                     help='the prompt; repeat it with video frame numbers to switch prompts: --prompt "0:a cat" '
                          '--prompt "40:a dog" (a switch lands on the first block starting at or after its frame)')
    gen.add_argument("--prompt-schedule", type=Path, default=None,
                     help='JSON file instead of --prompt: {"0": "a cat", "40": "a dog"} or '
                          '[{"start": 0, "end": 40, "prompt": "a cat"}, {"start": 40, "prompt": "a dog"}]')
    gen.add_argument("--keep-sink", action="store_true",
                     help="at a prompt switch keep the sink frames' cache from the old prompt (rolling cache)")
    gen.add_argument("--out", required=True, type=Path, help="output .mp4 path")
    gen.add_argument("--num-frames", type=_frame_count, default=None,
                     help="video frames, 1 + 4k, a start image or clip included (default: the model's); 'endless' "
                          "streams until interrupted, or to the end of a --prompt-schedule whose last range has one "
                          "(as the live studio's schedule downloads)")
    gen.add_argument("--window-frames", type=_positive, default=None,
                     help="rolling KV cache: keep the latest N latent frames (default: all; 12 when endless)")
    gen.add_argument("--sink-frames", type=_non_negative, default=None,
                     help="rolling KV cache: first latent frames never evicted (default 3)")
    gen.add_argument("--image", type=Path, default=None, help="image-to-video: the first frame")
    gen.add_argument("--video", type=Path, default=None,
                     help="video extension: a clip of 1 + 4k frames to continue (the output begins with it)")
    _add_model_arguments(gen)
    gen.add_argument("--seed", type=_seed, default=0, help="0 .. 2**64 - 1")
    _add_studio_parser(commands)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the video's size and block layout, and where it runs: shared by ``generate`` and ``studio``."""
    parser.add_argument("--model", type=Path, default=None,
                        help="a saved OneForcingPipeline folder or a Wan2.1 diffusers folder "
                             "(default: the demo model shipped in the package)")
    parser.add_argument("--transformer", type=Path, default=None,
                        help="a causal transformer checkpoint replacing the folder's (one_forcing.pt, "
                             "self_forcing_dmd.pt, ComfyUI/original .safetensors, or a diffusers transformer folder)")
    parser.add_argument("--tiny-vae", type=Path, default=None,
                        help="decode with a tiny TAEHV VAE for fast previews: taew2_1.pth or taew2_1.safetensors from "
                             "madebyollin/taehv (default: the full Wan VAE)")
    parser.add_argument("--num-attention-heads", type=_positive, default=None,
                        help="attention heads of a --transformer file that does not record them (files written by "
                             "export do; released Wan2.1 models are recognised); never guessed")
    parser.add_argument("--lora", action="append", type=_lora_spec, default=[], metavar="PATH[:STRENGTH]",
                        help="a Wan LoRA .safetensors file (any layout diffusers reads) at a strength (default 1); "
                             "repeat it to stack LoRAs")
    parser.add_argument("--height", type=_positive, default=None, help="pixels (default: the model's)")
    parser.add_argument("--width", type=_positive, default=None, help="pixels (default: the model's)")
    parser.add_argument("--frames-per-block", type=_positive, default=None, help="1 = frame-wise, 3 = chunk-wise")
    parser.add_argument("--independent-first-frame", action="store_true",
                        help="the checkpoint was trained with latent frame 0 as a block of its own "
                             "(blocks [1, 3, 3, ...]); default: what the transformer's config says")
    parser.add_argument("--timesteps", choices=sorted(map(cli_name, TIMESTEP_PRESETS)), default="one-step")
    parser.add_argument("--fps", type=_positive, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="default",
                        help="default: bfloat16 on CUDA, float32 on CPU; fp8_e4m3fn: the transformer's and text "
                             "encoder's weights kept in fp8, computed in the default dtype")


def _add_studio_parser(commands) -> None:
    studio = commands.add_parser("studio", help="live studio in the browser: watch the video being made, steer it, "
                                                "rewind and branch (needs aiohttp, the 'studio' extra)")
    studio.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only; anything else is reachable by others)")
    studio.add_argument("--port", type=_non_negative, default=8765, help="TCP port (0: a free one)")
    studio.add_argument("--max-sessions", type=_positive, default=2, help="pages served at a time")
    studio.add_argument("--ahead-blocks", type=_positive, default=4,
                        help="blocks generation may run ahead of what the page has shown")
    studio.add_argument("--snapshot-blocks", type=_positive, default=32,
                        help="block boundaries kept per page for rewinding (the latest ones)")
    studio.add_argument("--snapshot-mb", type=_positive, default=512, help="memory for those snapshots, per page")
    studio.add_argument("--history-mb", type=_positive, default=512,
                        help="memory for the frames kept for the mp4 download, per page (the oldest go first)")
    studio.add_argument("--max-prompt-chars", type=_positive, default=400)
    _add_model_arguments(studio)


ENDLESS = "endless"


def _frame_count(text: str) -> int | str:
    if text.strip().lower() in (ENDLESS, "inf", "infinite"):
        return ENDLESS
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a frame count (1 + 4k) or 'endless', got {text!r}")
    return count


def _integer_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive = _integer_at_least(1, "a positive integer")
_non_negative = _integer_at_least(0, "an integer >= 0")


def _lora_spec(text: str) -> tuple[Path, float]:
    """``PATH[:STRENGTH]`` -> (path, strength); a tail that is no number belongs to the path."""
    path, colon, tail = text.rpartition(":")
    try:
        strength = float(tail) if colon else None
    except ValueError:
        strength = None
    if strength is None:
        return Path(text), 1.0
    if not math.isfinite(strength):
        raise argparse.ArgumentTypeError(f"expected a finite LoRA strength, got {tail!r}")
    return Path(path), strength


def _seed(text: str) -> int:
    value = _non_negative(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**64, got {text!r}")
    return value


def _load_pipeline(args):
    from .pipelines.checks import check_finite_weights
    from .pipelines.pipeline_one_forcing import OneForcingPipeline
    from .pipelines.loading import load_transformer

    model_dir = args.model or DEMO_MODEL_DIR
    if not Path(model_dir).is_dir():
        if args.model is None:
            raise SystemExit(f"error: the demo model is not installed at {DEMO_MODEL_DIR}; pass --model DIR")
        raise SystemExit(f"error: --model {model_dir} is not a folder")
    _check_model_index(Path(model_dir) / "model_index.json")
    dtype, storage = resolve_dtype(args.dtype, args.device), storage_dtype(args.dtype)
    extra = {}
    if args.transformer is not None:
        path = args.transformer
        if not path.exists():
            raise SystemExit(f"error: --transformer {path} does not exist")
        extra["transformer"] = load_transformer(path, dtype, args.num_attention_heads, storage)
    pipe = OneForcingPipeline.from_pretrained(model_dir, dtype=dtype, storage_dtype=storage, **extra)
    if args.independent_first_frame:
        pipe.transformer.register_to_config(independent_first_frame=True)
    if args.tiny_vae is not None:
        pipe.set_preview_decoder(_load_tiny_vae(args.tiny_vae, dtype))
    _load_loras(pipe, args.lora)
    for name in ("transformer", "text_encoder", "vae"):
        source = args.transformer if name == "transformer" and args.transformer is not None else model_dir
        check_finite_weights(getattr(pipe, name), f"the {name} ({source})")
    return pipe.to(args.device)


def _load_loras(pipe, loras: list[tuple[Path, float]]) -> None:
    """Put each ``--lora`` on the pipeline at its strength (``pipelines/lora.py``'s stack, as the ComfyUI LoRA node)."""
    from .pipelines.lora import apply_lora_stack, choose_lora_file

    try:
        apply_lora_stack(pipe, [choose_lora_file(pipe, path, strength) for path, strength in loras])
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --lora: {error}") from None


def _check_model_index(path: Path) -> None:
    """A pipeline folder's ``model_index.json`` must be a JSON object (diffusers fails obscurely otherwise)."""
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: --model {path.parent} is not a pipeline folder (no model_index.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: {path} is not valid JSON ({error})") from None
    if not isinstance(index, dict):
        raise SystemExit(f"error: {path} must hold a JSON object, got a {type(index).__name__}")


def _load_tiny_vae(path: Path, dtype: torch.dtype):
    from .pipelines.loading import CheckpointError
    from .pipelines.tiny_vae import TinyWanVAE

    if not path.is_file():
        raise SystemExit(f"error: --tiny-vae {path} is not a file")
    try:
        return TinyWanVAE.from_single_file(path, dtype=dtype)
    except CheckpointError as error:
        raise SystemExit(f"error: --tiny-vae {error}") from None


def _schedule(args):
    from .pipelines.prompt_schedule import PromptSchedule

    if (args.prompt is None) == (args.prompt_schedule is None):
        raise SystemExit("error: give --prompt (once, or repeated as FRAME:text) or --prompt-schedule FILE")
    try:
        if args.prompt_schedule is not None:
            return PromptSchedule.load(args.prompt_schedule)
        return PromptSchedule.parse(args.prompt)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


def _endless_end(args, schedule):
    """(schedule, frame to stop at or None): an endless run whose schedule's last range has an end stops there (the
    schedule itself then runs open-ended, as an endless stream's must)."""
    last = schedule.ranges[-1]
    if args.num_frames != ENDLESS or last.end is None:
        return schedule, None
    return schedule.open_ended(), last.end


def _read_image(path: Path):
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, PIL.UnidentifiedImageError, OSError) as error:
        raise SystemExit(f"error: --image {path}: cannot read it as an image ({error})") from None


def _read_video(path: Path):
    """All frames of a video file as uint8 RGB [T, H, W, 3]."""
    from .pipelines.video_io import read_video_frames

    if not path.is_file():
        raise SystemExit(f"error: --video {path} does not exist")
    frames = read_video_frames(path)
    if not len(frames):
        raise SystemExit(f"error: --video {path}: no frame could be read")
    return frames


def _check_arguments(args) -> None:
    """What can be checked before the model loads: one line and exit status 2 for each problem."""
    if args.out.suffix.lower() != ".mp4":
        raise SystemExit(f"error: --out must end in .mp4, got {args.out}")
    if args.image is not None and args.video is not None:
        raise SystemExit("error: give --image or --video, not both")
    for flag in ("video", "image", "prompt_schedule", "transformer", "tiny_vae"):
        source = getattr(args, flag)
        if source is not None and _same_path(source, args.out):
            raise SystemExit(f"error: --out {args.out} is the --{flag.replace('_', '-')} input; choose another file")
    if args.keep_sink and args.window_frames is None and args.num_frames != ENDLESS:
        raise SystemExit("error: --keep-sink needs a rolling cache: pass --window-frames (or --num-frames endless)")
    if args.sink_frames is not None and args.window_frames is None and args.num_frames != ENDLESS:
        raise SystemExit("error: --sink-frames needs a rolling cache: pass --window-frames (or --num-frames endless)")
    if args.num_attention_heads is not None and args.transformer is None:
        raise SystemExit("error: --num-attention-heads applies to a --transformer file; a model folder records it")


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM: finish the video made so far, then exit with 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _stop(signum, frame):
    for name in STOP_SIGNALS:  # a second signal while the file is being finished must not tear it
        signal.signal(name, signal.SIG_IGN)
    raise Stopped(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def generate(args, on_block=None) -> Path:
    """Run ``generate`` for parsed ``args``; ``on_block(frames_written)`` is called after each block is written.

    The mp4 is written under a temporary name and replaces ``--out`` once finished (also when interrupted: the frames
    made so far). ``args.interrupted`` is the signal number that stopped the run, or 0.
    """
    from tqdm import tqdm

    from .pipelines.layout import latent_frame_count, video_frame_of_latent
    from .pipelines.video_io import Mp4Writer

    _check_arguments(args)
    schedule, stop_at = _endless_end(args, _schedule(args))
    context = {}
    if args.image is not None:
        context["image"] = _read_image(args.image)
    if args.video is not None:
        context["video"] = _read_video(args.video)
    args.interrupted = 0
    pipe = _load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_video_size
    num_frames = None if args.num_frames == ENDLESS else (args.num_frames or size["num_frames"])
    height, width = args.height or size["height"], args.width or size["width"]
    steps, first = timestep_preset(args.timesteps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if len(schedule) > 1:
        try:
            context_frames = 1 if "image" in context else 0
            if "video" in context:
                context_frames = latent_frame_count(len(context["video"]), pipe.vae_scale_factor_temporal, "--video")
            layout = pipe.block_layout(num_frames, args.frames_per_block, context_frames)
            switches = schedule.switches_in(layout, pipe.vae_scale_factor_temporal)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        for latent, prompt in switches:
            print(f"frame {video_frame_of_latent(latent, pipe.vae_scale_factor_temporal)}: {prompt}")
    generator = torch.Generator("cpu").manual_seed(args.seed)
    stream = pipe.stream(
        num_frames=num_frames, height=height, width=width, frames_per_block=args.frames_per_block,
        denoising_timesteps=steps, first_block_timesteps=first, generator=generator, output_type="np",
        prompt_schedule=schedule, keep_sink_on_switch=args.keep_sink, window_frames=args.window_frames,
        sink_frames=args.sink_frames, **context,
    )
    start = time.perf_counter()
    written = 0
    total = num_frames or stop_at
    with Mp4Writer(args.out, fps=args.fps) as writer, tqdm(total=total, unit="frame", desc="generating") as bar:
        try:
            for frames in stream:  # [1, T_block, H, W, 3] floats in 0..1
                block = frames[0] if stop_at is None else frames[0][: stop_at - written]
                writer.write((block * 255).round().clip(0, 255).astype("uint8"))
                written += block.shape[0]
                bar.update(block.shape[0])
                if on_block is not None:
                    on_block(written)
                if written == stop_at:
                    break
        except KeyboardInterrupt as stop:
            args.interrupted = getattr(stop, "signum", int(signal.SIGINT))
        finally:
            stream.close()
    seconds = max(time.perf_counter() - start, 1e-9)
    if args.interrupted:
        name = signal.Signals(args.interrupted).name
        print(f"interrupted ({name}): {args.out} holds the {written} frames made so far")
    print(f"wrote {written} frames ({width}x{height}) to {args.out} in {seconds:.1f} s "
          f"({written / seconds:.1f} frames/s)")
    return args.out


def studio(args) -> int:
    """Run the live studio until interrupted (Ctrl-C)."""
    try:
        from .studio.server import Studio, is_loopback, serve
    except ModuleNotFoundError as error:
        print(f"error: the studio needs {error.name}: pip install {error.name} (the 'studio' extra)",
              file=sys.stderr)
        return 1
    from .studio.live import StudioSettings

    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}, not loopback: anyone who can reach this machine can use the "
              "studio (and its GPU); there is no login", file=sys.stderr)
    try:
        pipe = _load_pipeline(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_video_size
    settings = StudioSettings(
        height=args.height or size["height"], width=args.width or size["width"],
        frames_per_block=args.frames_per_block, timesteps_name=args.timesteps,
        timesteps=timestep_preset(args.timesteps), fps=args.fps, ahead_blocks=args.ahead_blocks,
        snapshot_blocks=args.snapshot_blocks, snapshot_mb=args.snapshot_mb, history_mb=args.history_mb,
        max_prompt_chars=args.max_prompt_chars,
    )
    try:
        serve(Studio(pipe, settings, args.max_sessions), args.host, args.port,
              on_ready=lambda url: print(f"studio: open {url}", flush=True))
    except KeyboardInterrupt:
        pass
    except OSError as error:  # the port is taken, the address is not this machine's
        print(f"error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``oneforcing`` command. Bad arguments and inputs, and failed writes, end with one ``error:`` line (exit
    status 1 or 2); SIGINT and SIGTERM finish the video made so far and exit with 128 + the signal number."""
    args = _parser().parse_args(argv)
    if args.command == "studio":
        return studio(args)
    if args.command != "generate":
        return 0
    handlers = {name: signal.getsignal(name) for name in STOP_SIGNALS}
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            signal.signal(name, _stop)
        if hasattr(signal, "SIGXFSZ"):  # over a file-size limit a write fails (and is reported) instead of killing
            handlers[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        generate(args)
    except Stopped as stop:  # before the first frame: nothing to finish
        print(f"interrupted ({signal.Signals(stop.signum).name}) before any frame was written", file=sys.stderr)
        return 128 + stop.signum
    except (ValueError, MemoryError, OSError) as error:  # CheckpointError and NonFiniteError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if threading.current_thread() is threading.main_thread():
            for name, handler in handlers.items():
                signal.signal(name, handler)
    return 128 + args.interrupted if args.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
