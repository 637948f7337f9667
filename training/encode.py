"""Stage ``encode``: clips and captions -> a latent folder (normalised VAE latents + prompt embeddings).

Sources: the synthetic world of :mod:`.world` (``encode.source = "world"``), or a folder of ``*.mp4`` videos each
with a caption in a ``.txt`` file of the same name (``"videos"``; the first ``num_frames`` frames are taken, scaled
to cover ``height`` x ``width`` and centre-cropped). Prompts are encoded exactly as the pipeline encodes them
(:meth:`OneForcingPipeline.encode_prompt`), latents as the pipeline decodes them (:func:`encode_video`, normalised).
Ranks split the clips; existing sample files are kept, so an interrupted run continues.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..pipelines.pipeline_one_forcing import OneForcingPipeline
from ..pipelines.vae_streaming import encode_video
from ..pipelines.video_io import read_video_frames
from .config import TrainingConfig
from .data import NEGATIVE_PROMPT_FILE, write_latent_sample, write_negative_prompt
from .runner import StageRun


def _component_path(path: str | None, subfolder: str, what: str) -> Path:
    if not path:
        raise ValueError(f"encode.{what} is not set: give a folder loadable with from_pretrained")
    path = Path(path)
    if (path / subfolder).is_dir():  # a pipeline folder: take its component
        path = path / subfolder
    if not path.is_dir():
        raise FileNotFoundError(f"encode.{what}: {path} is not a folder")
    return path


def load_encoders(config: TrainingConfig, device) -> OneForcingPipeline:
    """Tokenizer, text encoder and VAE as a transformer-less pipeline (for its ``encode_prompt``)."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    e = config.encode
    tokenizer = AutoTokenizer.from_pretrained(str(_component_path(e.tokenizer, "tokenizer", "tokenizer")))
    text_encoder = UMT5EncoderModel.from_pretrained(str(_component_path(e.text_encoder, "text_encoder", "text_encoder")))
    vae = AutoencoderKLWan.from_pretrained(str(_component_path(e.vae, "vae", "vae")))
    pipe = OneForcingPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=None, vae=vae, scheduler=None)
    return pipe.to(device)


def read_video(path: Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The first ``num_frames`` frames of a video file as [3, T, H, W] in [-1, 1] (cover-scaled, centre-cropped)."""
    import cv2

    frames = []
    for frame in read_video_frames(path, num_frames):
        h, w = frame.shape[:2]
        scale = max(height / h, width / w)
        frame = cv2.resize(frame, (max(width, round(w * scale)), max(height, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
        top = (frame.shape[0] - height) // 2
        left = (frame.shape[1] - width) // 2
        frames.append(frame[top : top + height, left : left + width])
    if len(frames) < num_frames:
        raise ValueError(f"{path}: has {len(frames)} readable frames, encode.num_frames needs {num_frames}")
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return video / 127.5 - 1.0


def list_clips(config: TrainingConfig) -> list:
    """What to encode: world seeds, or (video path, caption) pairs."""
    e = config.encode
    if e.source == "world":
        return list(range(e.num_samples))
    folder = Path(e.videos_dir or "")
    if not e.videos_dir or not folder.is_dir():
        raise FileNotFoundError(f"encode.videos_dir {e.videos_dir!r} is not a folder of *.mp4 + *.txt captions")
    clips = []
    for video in sorted(folder.glob("*.mp4")):
        caption = video.with_suffix(".txt")
        if not caption.is_file():
            raise FileNotFoundError(f"{video} has no caption file {caption.name}")
        clips.append((video, caption.read_text().strip()))
    if not clips:
        raise FileNotFoundError(f"{folder} holds no *.mp4 videos")
    return clips[: e.num_samples] if e.num_samples > 0 else clips


def render_world_clip(config: TrainingConfig, seed: int, device=None) -> tuple[torch.Tensor, str]:
    """(video [3, T, H, W] in [-1, 1] on ``device``, caption) of the world scene ``seed``, as the ``encode`` section
    sets it up."""
    from . import world

    e = config.encode
    video, caption, _ = world.render_clip(
        seed, e.world_split, e.num_frames, e.height, e.width, e.world_two_object_prob, e.world_texture_prob,
        background_rgb=tuple(e.world_background_rgb) if e.world_background_rgb else None, device=device,
    )
    return video, caption


def load_clip(config: TrainingConfig, clip) -> tuple[torch.Tensor, str]:
    if config.encode.source == "world":
        return render_world_clip(config, config.seed * 1_000_000 + clip)
    e = config.encode
    path, caption = clip
    return read_video(path, e.num_frames, e.height, e.width), caption


def encode_latents(config: TrainingConfig) -> dict:
    e = config.encode
    out = config.latents_dir()
    run = StageRun(config, "encode", "never", directory=out)
    pipe = load_encoders(config, run.device)
    clips = list_clips(config)
    mine = [i for i in range(len(clips)) if i % run.world_size == run.rank]
    todo = [i for i in mine if not (out / f"sample_{i:06d}.safetensors").is_file()]
    run.print(f"[encode] {len(clips)} {e.source} clips of {e.num_frames}x{e.height}x{e.width} -> {out}")
    with torch.no_grad():
        if run.is_main and not (out / NEGATIVE_PROMPT_FILE).is_file():
            negative = pipe.encode_prompt(e.negative_prompt, max_sequence_length=e.max_sequence_length)[0]
            write_negative_prompt(out, negative, e.negative_prompt)
        for start in range(0, len(todo), e.batch_size):
            chunk = todo[start : start + e.batch_size]
            videos, captions = zip(*(load_clip(config, clips[i]) for i in chunk))
            latents = encode_video(pipe.vae, torch.stack(videos).to(run.device))
            embeds = pipe.encode_prompt(list(captions), max_sequence_length=e.max_sequence_length)
            for i, z, emb, caption in zip(chunk, latents, embeds, captions):
                write_latent_sample(out / f"sample_{i:06d}.safetensors", z.float(), emb, caption)
            run.log(start + len(chunk), {"clips_this_rank": float(start + len(chunk)),
                                         "latent_std": float(latents.float().std())}, force=True, reduce=False)
    run.accelerator.wait_for_everyone()
    return run.finish({"clips": len(clips), "folder": str(out)})
