"""Text encoding, prompt schedules and the autoregressive rollout, as plain functions the nodes call.

The rollout is the model's ``OneForcingPipeline`` run on a :class:`GenerationRequest` (``stream_request``,
``output_type="latent"``: the pipeline's session with its context, prompt-switch and rolling-cache handling), with the
model's LoRA stack on its transformer; this module only converts ComfyUI's values (CONDITIONING, raw VAE-space
LATENTs, the widgets) to that request, reports progress, honours cancellation between blocks and converts the result
back to a ComfyUI LATENT (raw VAE space).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..pipelines.layout import latent_frame_count, video_frame_count
from ..pipelines.lora import apply_lora_stack
from ..pipelines.pipeline_one_forcing import GenerationRequest, encode_prompt
from ..pipelines.presets import timestep_preset
from ..pipelines.prompt_schedule import PromptRange, PromptSchedule
from . import runtime
from .latents import latent_samples, to_normalised, to_raw
from .model_loading import OneForcingModel, load_text_encoder

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512
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
    with torch.no_grad():
        return [encode_prompt(tokenizer, patcher.model.text_encoder, prompt, MAX_SEQUENCE_LENGTH, device,
                              torch.float32).to(runtime.intermediate_device()) for prompt in prompts]


def encode_text(text_encoder_name: str, prompt: str, dtype: str = "default") -> list:
    """A ComfyUI CONDITIONING ``[[embeds [1, 512, dim] float32, {}]]`` of ``prompt``, encoded as the pipeline does
    (UMT5, 512 tokens, zero beyond the prompt's tokens)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return [[encode_texts(text_encoder_name, [prompt], dtype)[0], {}]]


_SCHEDULE_LINE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?:(.*)$", re.DOTALL)


def parse_schedule_text(text: str) -> PromptSchedule:
    """A prompt schedule written one range per line, as the CLI's repeated ``--prompt``: ``FRAME: text`` (from that
    video frame to the next line's) or ``START-END: text`` (END exclusive); frames are 0-based video frames. Text
    starting with ``[`` or ``{`` is read as JSON instead, as ``--prompt-schedule`` files (the live studio's download).

    Blank lines and lines starting with ``#`` are skipped; a single line without a frame is the prompt of the whole
    video. Lines must come in frame order. Gaps, overlaps and empty prompts are refused by :class:`PromptSchedule`;
    whether the switches fit the video's length is checked by the rollout, which knows it.
    """
    if not isinstance(text, str):
        raise TypeError(f"the prompt schedule must be text, got {type(text).__name__}")
    if text.lstrip().startswith(("[", "{")):
        return PromptSchedule.from_json(text)
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


def fit_text_length(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """Prompt embeddings [B, L, D] cut or zero-padded to the ``length`` tokens the model was trained with.

    The pipeline encodes prompts zero-padded to that length and the model attends to the padding rows too, so a
    CONDITIONING of another length (ComfyUI's Wan CLIP gives only the prompt's tokens, this package's encoder 512)
    must be brought to it for the model to see what it saw in training.
    """
    if embeds.shape[1] >= length:
        return embeds[:, :length]
    return torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1]))


WHOLE_VIDEO_NOISE = "whole video"
BLOCK_NOISE = "per block (as endless streams and the studio)"
NOISE_MODES = (WHOLE_VIDEO_NOISE, BLOCK_NOISE)


@dataclass(frozen=True)
class RolloutRequest:
    """What the rollout node is asked for (its inputs but the model; see ``OneForcingRollout`` for each one's meaning).

    Args:
        conditioning: one prompt, or a prompt schedule (see :func:`conditioning_prompts`).
        seed: the initial and re-noising noise (CPU generator: the same video on every device).
        width, height: pixels; 0 = the size the model recorded (its pipeline's ``default_video_size``; Wan2.1's
            832 x 480 for single files). length: video frames, 1 + 4k, a context's frames included.
        frames_per_block: latent frames per block; 0 = the model's own setting.
        timesteps: a ``pipelines.presets.TIMESTEP_PRESETS`` name.
        initial_latent: a LATENT whose shape sets batch, frames and size instead of width/height/length (as from
            ComfyUI's ``EmptyHunyuanLatentVideo``; its values are not used: the noise comes from ``seed``).
        context_latent: a LATENT [B, 16, f, H/8, W/8] (raw VAE space, e.g. an encoded start image or clip) committed
            as clean context before generating (image-to-video, video extension); it sets width and height, and the
            output begins with it.
        window_frames: 0 = a full KV cache; else a rolling cache of ``sink_frames`` first latent frames plus the
            ``window_frames`` latest, at constant memory (videos longer than the model was trained for).
        keep_sink_on_switch: at a prompt switch keep the sink frames' keys/values from the old prompt.
        noise: :data:`WHOLE_VIDEO_NOISE` (the pipeline's finite video: every frame's noise drawn at the start) or
            :data:`BLOCK_NOISE`: the endless stream ``oneforcing generate --num-frames endless`` and the live studio
            run (noise drawn block by block, the endless rolling cache unless ``window_frames`` is set), stopped
            after ``length`` frames; a schedule's closed end must then be ``length`` (a studio branch's schedule).
    """

    conditioning: list
    seed: int = 0
    width: int = 0
    height: int = 0
    length: int = 81
    frames_per_block: int = 0
    timesteps: str = "one step"
    initial_latent: dict | None = None
    context_latent: dict | None = None
    window_frames: int = 0
    sink_frames: int = 3
    keep_sink_on_switch: bool = False
    noise: str = WHOLE_VIDEO_NOISE


def generate_latents(model: OneForcingModel, request: RolloutRequest, *,
                     on_progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> dict:
    """Roll the video out block by block -> a ComfyUI LATENT ``{"samples": [B, 16, F, H/8, W/8]}`` in raw VAE space.

    ``on_progress(done_blocks, total_blocks)`` and ``should_stop()`` are hooks for callers outside ComfyUI.
    """
    pipe = model.pipeline
    generation = generation_request(model, request)
    context_frames = 0 if generation.context_latents is None else generation.context_latents.shape[2]
    layout = pipe.block_layout(generation.num_frames, generation.frames_per_block, context_frames)
    if request.noise == BLOCK_NOISE:
        generation = endless_stream(generation, layout, pipe.vae_scale_factor_temporal)
    runtime.check_interrupted(should_stop)
    apply_lora_stack(pipe, model.loras)  # the pipeline is shared by every model of one loader: set its adapters
    device = runtime.load(model.patcher)
    with runtime.cpu_threads(device):
        return _collect(model, pipe.stream_request(generation), layout, device, on_progress, should_stop)


def generation_request(model: OneForcingModel, request: RolloutRequest) -> GenerationRequest:
    """The pipeline's request for the rollout node's ``request``: ComfyUI's values converted (raw latents
    normalised, the CONDITIONING's prompt or schedule fitted to the model's prompt length, the seed as a CPU
    generator), the node's own widgets checked with their names; the pipeline checks the rest when it runs."""
    r, pipe = request, model.pipeline
    if r.frames_per_block < 0:
        raise ValueError(f"frames_per_block must be 0 (the model's setting) or positive, got {r.frames_per_block}")
    if r.noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {list(NOISE_MODES)}, got {r.noise!r}")
    if r.window_frames < 0 or r.sink_frames < 0:
        raise ValueError(f"window_frames and sink_frames must be >= 0, got {r.window_frames} and {r.sink_frames}")
    trained = model.trained_frames_per_block
    if r.frames_per_block and trained and r.frames_per_block != trained:
        logger.warning("frames_per_block=%d, but the model was trained with %d latent frames per block: its videos "
                       "may degrade (0 = the model's own setting)", r.frames_per_block, trained)
    denoising, first_block = timestep_preset(r.timesteps)
    batch, (width, height, length) = _video_size(pipe, r)
    latent_frames = latent_frame_count(length, pipe.vae_scale_factor_temporal, what="length")
    context = _context(model, r, (width, height), batch)
    if context is not None:
        spatial = pipe.vae_scale_factor_spatial
        width, height = context.shape[4] * spatial, context.shape[3] * spatial
        if context.shape[2] >= latent_frames:
            raise ValueError(f"length {length} leaves no frame to generate after the context_latent's "
                             f"{video_frame_count(context.shape[2])} video frames: length counts the whole video, "
                             "context included")
    prompts = _fit_prompts(conditioning_prompts(r.conditioning, model.transformer.config.text_dim),
                           pipe.default_max_sequence_length)
    first = prompts.prompts[0] if isinstance(prompts, PromptSchedule) else prompts
    if first.shape[0] not in (1, batch):
        raise ValueError(f"conditioning batch {first.shape[0]} does not match the latent batch {batch}")
    if isinstance(prompts, PromptSchedule) and any(p.shape[0] != first.shape[0] for p in prompts.prompts):
        raise ValueError("the prompts of the schedule have different batch sizes")
    schedule = isinstance(prompts, PromptSchedule)
    return GenerationRequest(
        prompt_embeds=None if schedule else prompts, prompt_schedule=prompts if schedule else None,
        num_frames=length, height=height, width=width, frames_per_block=r.frames_per_block or None,
        denoising_timesteps=denoising, first_block_timesteps=first_block,
        num_videos_per_prompt=batch // first.shape[0], generator=torch.Generator("cpu").manual_seed(int(r.seed)),
        output_type="latent", context_latents=context, window_frames=r.window_frames or None,
        sink_frames=r.sink_frames if r.window_frames else None, keep_sink_on_switch=r.keep_sink_on_switch,
    )


def endless_stream(generation: GenerationRequest, layout, temporal: int) -> GenerationRequest:
    """The endless stream whose first ``layout.total_frames`` latent frames are the video ``generation`` asks for
    with block-by-block noise (what ``oneforcing generate --num-frames endless`` runs for a closed schedule)."""
    schedule = generation.prompt_schedule
    if schedule is not None:
        end, length = schedule.ranges[-1].end, video_frame_count(layout.total_frames, temporal)
        if end is not None and end != length:
            raise ValueError(f"the prompt schedule ends at video frame {end} but length is {length}: set length to "
                             f"{end} to make the video it schedules (a studio branch's schedule ends at its last "
                             "frame)")
        schedule.switches_in(layout, temporal)  # the switches must land inside the video
        schedule = schedule.open_ended()
    return replace(generation, num_frames=None, prompt_schedule=schedule)


def _video_size(pipe, request: RolloutRequest) -> tuple[int, tuple[int, int, int]]:
    """(batch, (width, height, length)): the initial latent's shape if one is given, else the widgets (0 = the
    model's recorded size)."""
    if request.initial_latent is None:
        size = pipe.default_video_size
        return 1, (request.width or size["width"], request.height or size["height"], request.length)
    shape = latent_samples(request.initial_latent, "initial_latent").shape
    spatial = pipe.vae_scale_factor_spatial
    return shape[0], (shape[4] * spatial, shape[3] * spatial, video_frame_count(shape[2]))


def _context(model: OneForcingModel, request: RolloutRequest, size: tuple[int, int], batch: int):
    """The context LATENT as normalised latents [B, 16, f, h, w] (None without one), checked against the video."""
    if request.context_latent is None:
        return None
    context = latent_samples(request.context_latent, "context_latent")
    spatial = model.pipeline.vae_scale_factor_spatial
    pixels = (context.shape[4] * spatial, context.shape[3] * spatial)
    if request.initial_latent is not None and pixels != size:
        raise ValueError(f"context_latent is {pixels[0]}x{pixels[1]} pixels but initial_latent is {size[0]}x{size[1]}")
    multiple = spatial * model.transformer.config.patch_size[1]
    if pixels[0] % multiple or pixels[1] % multiple:
        raise ValueError(f"context_latent is {pixels[0]}x{pixels[1]} pixels; the model makes videos whose width and "
                         f"height are multiples of {multiple}: encode the start image at such a size")
    if context.shape[0] not in (1, batch):
        raise ValueError(f"context_latent holds {context.shape[0]} videos, the latent batch is {batch}")
    return to_normalised(context, model.latents_mean, model.latents_std)


def _fit_prompts(prompts, text_length: int):
    """Embeddings (or a schedule's) as float32 tensors of the model's prompt length."""
    if isinstance(prompts, PromptSchedule):
        return PromptSchedule([PromptRange(r.start, r.end, fit_text_length(r.prompt.float(), text_length), r.label)
                               for r in prompts.ranges])
    return fit_text_length(prompts.float(), text_length)


def _collect(model: OneForcingModel, stream, layout, device, on_progress, should_stop) -> dict:
    """Run the pipeline's block stream of a video laid out as ``layout`` (a ``BlockLayout``) into a raw-space
    LATENT, with progress, previews and cancel per block."""
    out, start, done = [], 0, 0
    progress = runtime.Progress(layout.num_blocks, on_progress)
    preview = runtime.latent_previewer(device)
    try:
        runtime.check_interrupted(should_stop)
        for latents in stream:  # the context's latents first (if any), then one item per generated block
            latents = latents[:, :, : layout.total_frames - start]  # an endless stream's last block may run over
            out.append(latents.float().to(runtime.intermediate_device()))
            start += latents.shape[2]
            if start > layout.context_frames:
                done += 1
                progress.update(done, preview(latents) if preview is not None else None)
            if start >= layout.total_frames:
                break  # an endless stream goes on
            runtime.check_interrupted(should_stop)  # cancel between blocks; closing the stream frees the cache
    finally:
        stream.close()
        del stream
        runtime.free_cache()
    return {"samples": to_raw(torch.cat(out, dim=2), model.latents_mean, model.latents_std)}
