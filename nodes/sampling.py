"""Text encoding, prompt schedules and the autoregressive rollout, as plain functions the nodes call.

The rollout is ``OneForcingPipeline.stream`` (``output_type="latent"``, which runs ``pipelines.rollout.causal_rollout``
with the pipeline's context, prompt-switch and rolling-cache handling); this module only converts ComfyUI's values
(CONDITIONING, raw VAE-space LATENTs) to the pipeline's arguments, reports progress, honours cancellation between
blocks and converts the result back to a ComfyUI LATENT (raw VAE space).
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch

from ..pipelines.pipeline_one_forcing import OneForcingPipeline
from ..pipelines.prompt_schedule import PromptRange, PromptSchedule
from ..pipelines.layout import BlockLayout
from . import runtime
from .latents import latent_samples, to_normalised, to_raw
from .model_loading import OneForcingModel, load_text_encoder

logger = logging.getLogger(__name__)

TIMESTEP_PRESETS = {
    # name -> (denoising_timesteps of every block, first_block_timesteps or None); un-warped, as the scheduler takes
    "one step": ([1000], None),
    "first block four steps": ([1000], [1000, 750, 500, 250]),
    "four steps": ([1000, 750, 500, 250], None),
}
MAX_SEQUENCE_LENGTH = 512
VAE_TEMPORAL, VAE_SPATIAL = 4, 8
# pixels per Wan2.1 patch side (8 per latent pixel, 2 x 2 latent pixels per patch): frame sizes come in its multiples;
# the rollout reads the loaded model's patch size, the encoder (no model at hand) assumes Wan2.1's
SIZE_MULTIPLE = VAE_SPATIAL * 2
# a CONDITIONING entry's dict keys marking it as one range of a prompt schedule: (start, end or None) in video
# frames, and the prompt's text (for error messages)
SCHEDULE_KEY = "oneforcing_frames"
SCHEDULE_TEXT_KEY = "oneforcing_prompt"


def encode_texts(text_encoder_name: str, prompts: list[str], dtype: str = "default") -> list[torch.Tensor]:
    """UMT5 embeddings ``[1, 512, dim]`` (float32, zero beyond each prompt's tokens) of each prompt, encoded as the
    pipeline does; the encoder is loaded once for all of them."""
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("the prompt is empty: write what the video should show (a distilled model has no "
                             "classifier-free guidance that an empty prompt could serve)")
    tokenizer, patcher = load_text_encoder(text_encoder_name, dtype)
    device = runtime.load(patcher)
    encoder = OneForcingPipeline(
        tokenizer=tokenizer, text_encoder=patcher.model.text_encoder, transformer=None, vae=None, scheduler=None
    )
    out = []
    with torch.no_grad():
        for prompt in prompts:
            embeds = encoder.encode_prompt(prompt, max_sequence_length=MAX_SEQUENCE_LENGTH, device=device,
                                           dtype=torch.float32)
            out.append(embeds.to(runtime.intermediate_device()))
    return out


def encode_text(text_encoder_name: str, prompt: str, dtype: str = "default") -> list:
    """A ComfyUI CONDITIONING ``[[embeds [1, 512, dim] float32, {}]]`` of ``prompt``, encoded as the pipeline does
    (UMT5, 512 tokens, zero beyond the prompt's tokens)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return [[encode_texts(text_encoder_name, [prompt], dtype)[0], {}]]


_SCHEDULE_LINE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?:(.*)$", re.DOTALL)


def parse_schedule_text(text: str) -> PromptSchedule:
    """A prompt schedule written one range per line, as the CLI's repeated ``--prompt``: ``FRAME: text`` (from that
    video frame to the next line's) or ``START-END: text`` (END exclusive); frames are 0-based video frames.

    Blank lines and lines starting with ``#`` are skipped; a single line without a frame is the prompt of the whole
    video. Lines must come in frame order. Gaps, overlaps and empty prompts are refused by :class:`PromptSchedule`;
    whether the switches fit the video's length is checked by the rollout, which knows it.
    """
    if not isinstance(text, str):
        raise TypeError(f"the prompt schedule must be text, got {type(text).__name__}")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise ValueError("the prompt schedule is empty: write one 'FRAME: prompt' per line, starting with '0: ...'")
    if len(lines) == 1 and not _SCHEDULE_LINE.match(lines[0][1]):
        return PromptSchedule([(0, lines[0][1])])
    previous = None
    for number, line in lines:
        match = _SCHEDULE_LINE.match(line)
        if match is None:
            raise ValueError(f"prompt schedule line {number} ({line[:40]!r}): each line needs its first video frame, "
                             "as 'FRAME: prompt' (e.g. '0: a cat', '40: a dog')")
        start = int(match.group(1))
        if previous is not None and start <= previous[1]:
            raise ValueError(f"prompt schedule line {number} starts at frame {start}, not after line {previous[0]} "
                             f"(frame {previous[1]}): list the prompts in frame order, each at a later frame")
        previous = (number, start)
    try:
        return PromptSchedule.parse([line for _, line in lines])
    except ValueError as err:
        raise ValueError(f"prompt schedule: {err}") from None


def schedule_conditioning(text_encoder_name: str, schedule: str, dtype: str = "default") -> list:
    """A CONDITIONING carrying a prompt schedule: one ``[embeds [1, 512, dim], {SCHEDULE_KEY: (start, end)}]`` entry
    per range (``end`` None: to the next range or the video's end), in frame order."""
    parsed = parse_schedule_text(schedule)
    texts = list(dict.fromkeys(parsed.prompts))  # each distinct prompt encoded once
    embeds = dict(zip(texts, encode_texts(text_encoder_name, texts, dtype)))
    return [[embeds[r.prompt], {SCHEDULE_KEY: (r.start, r.end), SCHEDULE_TEXT_KEY: r.prompt}] for r in parsed.ranges]


def _entry_embeds(entry, text_dim: int) -> torch.Tensor:
    embeds = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError("conditioning entries must be [tensor [B, L, dim], dict] pairs")
    if embeds.shape[-1] != text_dim:
        raise ValueError(
            f"conditioning has width {embeds.shape[-1]}, the model's text encoder width is {text_dim} "
            "(Wan2.1 models take UMT5-XXL embeddings: use a 'wan' CLIP or this package's text encoder)"
        )
    return embeds


def conditioning_prompts(conditioning, text_dim: int) -> torch.Tensor | PromptSchedule:
    """The prompt of a CONDITIONING: one prompt's embeddings [B, L, text_dim] (this package's text encoder, or
    ComfyUI's ``CLIPTextEncode`` with a ``wan`` CLIP), or a :class:`PromptSchedule` of embeddings (from the
    prompt-schedule node: every entry carries its frame range)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise TypeError("conditioning must be a non-empty ComfyUI CONDITIONING list of [tensor, dict] pairs")
    frames = [entry[1].get(SCHEDULE_KEY) if isinstance(entry, (list, tuple)) and len(entry) > 1
              and isinstance(entry[1], dict) else None for entry in conditioning]
    if all(f is None for f in frames):
        if len(conditioning) != 1:
            raise ValueError(
                f"conditioning holds {len(conditioning)} entries; the rollout takes one prompt, or a prompt schedule "
                "from One-Forcing Prompt Schedule (no combine/area/timestep ranges)"
            )
        return _entry_embeds(conditioning[0], text_dim)
    if any(f is None for f in frames):
        raise ValueError("conditioning mixes prompt-schedule entries with plain ones: connect One-Forcing Prompt "
                         "Schedule directly (combining it with other conditioning is not supported)")
    ranges = [PromptRange(int(start), None if end is None else int(end), _entry_embeds(entry, text_dim),
                          str(entry[1].get(SCHEDULE_TEXT_KEY) or f"prompt {i + 1}"))  # errors name the text
              for i, (entry, (start, end)) in enumerate(zip(conditioning, frames))]
    return PromptSchedule(ranges)


def conditioning_embeds(conditioning, text_dim: int) -> torch.Tensor:
    """The prompt embeddings [B, L, text_dim] of a one-prompt CONDITIONING (see :func:`conditioning_prompts`)."""
    prompts = conditioning_prompts(conditioning, text_dim)
    if isinstance(prompts, PromptSchedule):
        if len(prompts) > 1:
            raise ValueError("this conditioning is a prompt schedule; one prompt is needed here")
        return prompts.prompts[0]
    return prompts


def fit_text_length(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """Prompt embeddings [B, L, D] cut or zero-padded to the ``length`` tokens the model was trained with.

    The pipeline encodes prompts zero-padded to that length and the model attends to the padding rows too, so a
    CONDITIONING of another length (ComfyUI's Wan CLIP gives only the prompt's tokens, this package's encoder 512)
    must be brought to it for the model to see what it saw in training.
    """
    if embeds.shape[1] >= length:
        return embeds[:, :length]
    return torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1]))


def check_video_size(width: int, height: int, length: int, multiple: int) -> int:
    """Latent frames of a ``length``-frame video; clear errors for sizes the model cannot make."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be at least 1 video frame, got {length}")
    if (length - 1) % VAE_TEMPORAL:
        raise ValueError(f"length must be 1 + {VAE_TEMPORAL}k video frames (e.g. 81), got {length}")
    return (length - 1) // VAE_TEMPORAL + 1


def generate_latents(
    model: OneForcingModel,
    conditioning,
    seed: int,
    width: int,
    height: int,
    length: int,
    frames_per_block: int = 0,
    timesteps: str = "one step",
    initial_latent=None,
    context_latent=None,
    window_frames: int = 0,
    sink_frames: int = 3,
    keep_sink_on_switch: bool = False,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Roll the video out block by block -> a ComfyUI LATENT ``{"samples": [B, 16, F, H/8, W/8]}`` in raw VAE space.

    Args:
        model: from the loader node.
        conditioning: one prompt, or a prompt schedule (see :func:`conditioning_prompts`).
        seed: the initial and re-noising noise (CPU generator: the same video on every device).
        width, height: pixels, multiples of 16; 0 = the size the model recorded (its pipeline's
            ``default_video_size``; Wan2.1's 832 x 480 for single files). length: video frames, 1 + 4k, a context's
            frames included.
        frames_per_block: latent frames per block; 0 = the loader's setting.
        timesteps: a :data:`TIMESTEP_PRESETS` name.
        initial_latent: a LATENT whose shape sets batch, frames and size instead of width/height/length (as from
            ComfyUI's ``EmptyHunyuanLatentVideo``; its values are not used: the noise comes from ``seed``).
        context_latent: a LATENT [B, 16, f, H/8, W/8] (raw VAE space, e.g. an encoded start image or clip) committed
            as clean context before generating (image-to-video, video extension); it sets width and height, and the
            output begins with it.
        window_frames: 0 = a full KV cache; else a rolling cache of ``sink_frames`` first latent frames plus the
            ``window_frames`` latest, at constant memory (videos longer than the model was trained for).
        keep_sink_on_switch: at a prompt switch keep the sink frames' keys/values from the old prompt.
        on_progress(done_blocks, total_blocks), should_stop(): hooks for callers outside ComfyUI.
    """
    transformer = model.transformer
    if timesteps not in TIMESTEP_PRESETS:
        raise ValueError(f"timesteps must be one of {', '.join(TIMESTEP_PRESETS)}, got {timesteps!r}")
    if frames_per_block < 0:
        raise ValueError(f"frames_per_block must be 0 (the model's setting) or positive, got {frames_per_block}")
    if window_frames < 0 or sink_frames < 0:
        raise ValueError(f"window_frames and sink_frames must be >= 0, got {window_frames} and {sink_frames}")
    multiple = VAE_SPATIAL * transformer.config.patch_size[1]
    pipe = OneForcingPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                              scheduler=model.scheduler, default_video_size=model.video_size)
    width, height = width or pipe.default_video_size["width"], height or pipe.default_video_size["height"]
    batch = 1
    if initial_latent is not None:
        shape = latent_samples(initial_latent, "initial_latent").shape
        batch = shape[0]
        width, height, length = shape[4] * VAE_SPATIAL, shape[3] * VAE_SPATIAL, (shape[2] - 1) * VAE_TEMPORAL + 1
    context = None
    if context_latent is not None:
        context = latent_samples(context_latent, "context_latent")
        size = (context.shape[4] * VAE_SPATIAL, context.shape[3] * VAE_SPATIAL)
        if initial_latent is not None and size != (width, height):
            raise ValueError(f"context_latent is {size[0]}x{size[1]} pixels but initial_latent is {width}x{height}")
        width, height = size
        if width % multiple or height % multiple:
            raise ValueError(f"context_latent is {width}x{height} pixels; the model makes videos whose width and "
                             f"height are multiples of {multiple}: encode the start image at such a size")
        if context.shape[0] not in (1, batch):
            raise ValueError(f"context_latent holds {context.shape[0]} videos, the latent batch is {batch}")
    num_frames = check_video_size(width, height, length, multiple)
    if context is not None and context.shape[2] >= num_frames:
        raise ValueError(f"length {length} leaves no frame to generate after the context_latent's "
                         f"{1 + VAE_TEMPORAL * (context.shape[2] - 1)} video frames: length counts the whole video, "
                         "context included")
    prompts = conditioning_prompts(conditioning, transformer.config.text_dim)
    first = prompts.prompts[0] if isinstance(prompts, PromptSchedule) else prompts
    if first.shape[0] not in (1, batch):
        raise ValueError(f"conditioning batch {first.shape[0]} does not match the latent batch {batch}")
    if frames_per_block and frames_per_block != model.frames_per_block:
        logger.warning("frames_per_block=%d, but the model was trained with %d latent frames per block: its videos "
                       "may degrade (0 = the model's own setting)", frames_per_block, model.frames_per_block)
    frames_per_block = frames_per_block or model.frames_per_block
    if isinstance(prompts, PromptSchedule) and any(p.shape[0] != first.shape[0] for p in prompts.prompts):
        raise ValueError("the prompts of the schedule have different batch sizes")
    denoising, first_block = TIMESTEP_PRESETS[timesteps]

    runtime.check_interrupted(should_stop)
    device = runtime.load(model.patcher)
    # ComfyUI runs nodes under torch.inference_mode(); the KV cache tracks its prompt through the tensor version
    # counter, which inference tensors lack: the rollout runs as plain no-grad code on plain tensors
    with torch.inference_mode(False), torch.no_grad(), runtime.cpu_threads(device):
        prompts = _fit_prompts(prompts, model.text_length)
        if context is not None:
            context = to_normalised(context.clone(), model.latents_mean, model.latents_std)
        pipe.set_progress_bar_config(disable=True)  # ComfyUI shows its own progress bar
        stream = pipe.stream(
            **({"prompt_schedule": prompts} if isinstance(prompts, PromptSchedule) else {"prompt_embeds": prompts}),
            num_frames=length, height=height, width=width, frames_per_block=frames_per_block,
            denoising_timesteps=denoising, first_block_timesteps=first_block,
            num_videos_per_prompt=batch // first.shape[0], generator=torch.Generator("cpu").manual_seed(int(seed)),
            output_type="latent", context_latents=context,
            window_frames=window_frames or None, sink_frames=sink_frames if window_frames else None,
            keep_sink_on_switch=keep_sink_on_switch,
        )
        layout = pipe.block_layout(length, frames_per_block, 0 if context is None else context.shape[2])
        return _collect(model, stream, (batch, height, width), layout, device, on_progress, should_stop)


def _fit_prompts(prompts, text_length: int):
    """Embeddings (or a schedule's) as plain float32 tensors of the model's prompt length."""
    if isinstance(prompts, PromptSchedule):
        return PromptSchedule([PromptRange(r.start, r.end, fit_text_length(r.prompt.clone(), text_length), r.label)
                               for r in prompts.ranges])
    return fit_text_length(prompts.clone(), text_length)


def _collect(model, stream, size: tuple[int, int, int], layout: BlockLayout, device, on_progress,
             should_stop) -> dict:
    """Run the pipeline's block stream of a video laid out as ``layout`` into a raw-space LATENT of ``size``
    (batch, height, width), with progress, previews and cancel per block."""
    batch, height, width = size
    num_frames, context_frames = layout.total_frames, layout.context_frames
    shape = (batch, model.transformer.config.in_channels, num_frames, height // VAE_SPATIAL, width // VAE_SPATIAL)
    out = torch.zeros(shape, dtype=torch.float32, device=runtime.intermediate_device())
    progress = runtime.Progress(layout.num_blocks, on_progress)
    preview = runtime.latent_previewer(device)
    start, done = 0, 0
    try:
        runtime.check_interrupted(should_stop)
        for latents in stream:  # the context's latents first (if any), then one item per generated block
            out[:, :, start : start + latents.shape[2]] = latents.float().to(out.device)
            start += latents.shape[2]
            if start > context_frames:
                done += 1
                progress.update(done, preview(latents) if preview is not None else None)
            if start < num_frames:
                runtime.check_interrupted(should_stop)  # cancel between blocks; closing the stream frees the cache
    finally:
        stream.close()
        del stream
        runtime.free_cache()
    return {"samples": to_raw(out, model.latents_mean, model.latents_std)}
