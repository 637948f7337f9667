"""``OneForcingPipeline``: text to video with a one-step (or few-step) causal Wan transformer.

The video is generated block by block (1 latent frame per block = frame-wise, 3 = chunk-wise) by a
:class:`~.session.GenerationSession` that ``__call__`` and ``stream`` drive, and each block is decoded as soon as it exists by a streaming Wan VAE decoder that keeps its
causal-convolution cache between blocks (the result equals one full decode). No classifier-free guidance: distilled
models are used with one conditional forward per step.
"""

from __future__ import annotations

import html
import itertools
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from tqdm.auto import tqdm

from .checks import RequestPlan, check_arguments, check_finite_inputs, check_request, exclusive_use
from .decode_overlap import SideStreamDecoder
from .prompt_schedule import PromptSchedule
from .block_steps import PromptHandle, RolloutBlock
from .kv_cache import KVCache
from .layout import BlockLayout, latent_frame_count
from .fp8 import FP8_STORAGE_DTYPE, UMT5_FP8_LAYERS, enable_fp8_storage
from .loading import check_storage_dtype
from .lora import OneForcingLoraLoaderMixin
from .session import CachePolicy, GenerationSession, NoiseSource, SamplingSettings
from .scheduling_one_forcing import OneForcingScheduler
from .tiny_vae import TinyWanStreamingDecoder, TinyWanVAE
from .transformer_causal_wan import CausalWanTransformer3DModel
from .vae_streaming import WanStreamingDecoder, encode_video

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
ENDLESS_SINK_FRAMES = 3  # default rolling cache (latent frames): LongLive's sink of one 3-frame chunk ...
ENDLESS_WINDOW_FRAMES = 12  # ... plus the 12 latest frames


@dataclass
class OneForcingPipelineOutput(BaseOutput):
    """``frames``: np [B, T, H, W, 3] in 0..1, pt [B, T, 3, H, W], a list of lists of PIL images, or the normalised
    latents [B, 16, F, H/8, W/8] for ``output_type="latent"``."""

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


def _clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class OneForcingPipeline(DiffusionPipeline, OneForcingLoraLoaderMixin):
    """Autoregressive text-to-video with a causal Wan2.1 transformer and a KV cache.

    Components: ``tokenizer`` (T5/UMT5), ``text_encoder`` (``UMT5EncoderModel``), ``transformer``
    (:class:`CausalWanTransformer3DModel`; a plain ``WanTransformer3DModel`` is converted), ``vae``
    (``AutoencoderKLWan``), ``scheduler`` (:class:`OneForcingScheduler`; any other scheduler found in a Wan folder is
    replaced by the default one-step schedule).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _exclude_from_cpu_offload = ["vae"]  # decoded block by block while the transformer works: keep it resident
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        transformer: CausalWanTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: OneForcingScheduler,
        default_video_size: dict | None = None,
        max_sequence_length: int | None = None,
    ):
        """``default_video_size`` ({"num_frames", "height", "width"}) and ``max_sequence_length`` record what the
        model was trained with (saved in ``model_index.json``); the CLI and the nodes use them as defaults."""
        super().__init__()
        if isinstance(transformer, WanTransformer3DModel) and not isinstance(transformer, CausalWanTransformer3DModel):
            logger.info("Converting WanTransformer3DModel to CausalWanTransformer3DModel (same weights).")
            transformer = CausalWanTransformer3DModel.from_wan(transformer)
        if scheduler is not None and not isinstance(scheduler, OneForcingScheduler):
            logger.info(f"Replacing {type(scheduler).__name__} with the one-step OneForcingScheduler.")
            scheduler = OneForcingScheduler()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self.register_to_config(default_video_size=default_video_size, max_sequence_length=max_sequence_length)
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- low memory ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, storage_dtype: torch.dtype | None = None,
                        **kwargs):
        """diffusers' ``DiffusionPipeline.from_pretrained``; ``storage_dtype=torch.float8_e4m3fn`` then stores the
        transformer's and the text encoder's linear weights in fp8 (:meth:`enable_fp8_storage`), computing in
        ``dtype``. None or a float dtype: weights as loaded."""
        check_storage_dtype(storage_dtype)
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if storage_dtype == FP8_STORAGE_DTYPE:
            pipe.enable_fp8_storage()
        return pipe

    def enable_fp8_storage(self, components: tuple[str, ...] = ("transformer", "text_encoder")) -> None:
        """Weight-only fp8: keep the linear weights of ``components`` in float8_e4m3fn with a per-layer scale,
        upcast layer by layer to the component's dtype at compute (see ``pipelines/fp8.py``). Roughly halves the
        memory of bf16 weights; not undone (reload for full precision). LoRA adapters still load and run unfused."""
        for name in components:
            if name == "transformer":
                self.transformer.enable_fp8_storage()
            elif name == "text_encoder":
                enable_fp8_storage(self.text_encoder, UMT5_FP8_LAYERS, self.text_encoder.dtype)
            else:
                raise ValueError(f"fp8 storage applies to the transformer and the text_encoder, not {name!r}")

    def enable_group_offload(self, onload_device: torch.device, offload_device: torch.device = torch.device("cpu"),
                             offload_type: str = "block_level", num_blocks_per_group: int | None = None, **kwargs):
        """diffusers' group offload at block level (each transformer and text-encoder block is moved to
        ``onload_device`` when called). The VAE is moved to ``onload_device`` and stays there unless
        ``exclude_modules`` says otherwise: the streaming decoder runs between the transformer's blocks. Leaf level is
        refused (not verified with the causal forward, which reads each block's modulation table outside any leaf
        module); block level, model offload and ``enable_sequential_cpu_offload`` (the VAE kept resident) work."""
        if offload_type != "block_level":
            raise NotImplementedError(f"offload_type {offload_type!r} is not supported by OneForcingPipeline; use "
                                      '"block_level", enable_model_cpu_offload() or enable_sequential_cpu_offload()')
        kwargs.setdefault("exclude_modules", ["vae"])
        super().enable_group_offload(onload_device, offload_device, offload_type, num_blocks_per_group or 1, **kwargs)
        if "vae" in kwargs["exclude_modules"] and self.vae is not None:
            self.vae.to(onload_device)

    # -- CUDA graphs --------------------------------------------------------------------------------------------------
    _kept_kv_cache: tuple | None = None  # (geometry, KVCache) of the last run, kept while CUDA graphs are on

    def enable_cuda_graphs(self, warmup: int = 1) -> None:
        """Replay the transformer's cached forwards as CUDA graphs (``CausalWanTransformer3DModel.enable_cuda_graphs``)
        and keep the KV cache from run to run, since the graphs read its buffers.

        The first video of a given size and block layout runs eagerly and the second captures the graphs; from then
        on each block is one graph launch. Worth it when several videos are made with the same settings; the KV cache
        stays allocated between runs until :meth:`disable_cuda_graphs`.
        """
        self.transformer.enable_cuda_graphs(warmup=warmup)

    def disable_cuda_graphs(self) -> None:
        """Drop the graphs and the kept KV cache."""
        self.transformer.disable_cuda_graphs()
        self._kept_kv_cache = None

    def _new_kv_cache(self, policy: CachePolicy, layout: BlockLayout, batch: int, latent_size: tuple[int, int],
                      device) -> tuple[tuple, KVCache]:
        """(geometry, the run's KV cache): with CUDA graphs on, the last run's (reset) when its geometry matches (the
        graphs read its buffers), else a new one."""
        frames = 1 if policy.window_frames is not None else layout.cache_frames(policy.commit_last_block)
        geometry = (batch, frames, *latent_size, torch.device(device), self.transformer.dtype,
                    tuple(sorted(policy.rolling_settings().items())))
        kept, self._kept_kv_cache = self._kept_kv_cache, None  # taken: a run started meanwhile makes its own
        graphs = self.transformer.cuda_graphs
        if graphs is not None and kept is not None and kept[0] == geometry:
            kept[1].reset()
            return geometry, kept[1]
        if graphs is not None and kept is not None:
            graphs.reset()  # they are bound to the old cache: free it, and their memory, before the new one is made
        del kept
        return geometry, policy.make(self.transformer, layout, batch, latent_size, device)

    # -- decoding -----------------------------------------------------------------------------------------------------
    _preview_decoder: TinyWanVAE | None = None

    @property
    def preview_decoder(self) -> TinyWanVAE | None:
        """The tiny VAE that decodes the video instead of the Wan VAE, or None (the default: the Wan VAE)."""
        return self._preview_decoder

    def set_preview_decoder(self, tiny_vae: TinyWanVAE | None) -> None:
        """Decode with a tiny TAEHV-architecture VAE (much faster, lower quality: previews) instead of the Wan VAE;
        ``None`` goes back to the Wan VAE. Frame counts and sizes are the same either way. Image and video context is
        still encoded by the Wan VAE. At each run the tiny VAE is moved to the pipeline's execution device (its dtype
        is kept); it is not saved by ``save_pretrained``.

        Example: ``pipe.set_preview_decoder(TinyWanVAE.from_single_file("taew2_1.pth", dtype=torch.bfloat16))``.
        """
        if tiny_vae is not None:
            if not isinstance(tiny_vae, TinyWanVAE):
                raise TypeError(f"the preview decoder must be a TinyWanVAE or None, got {type(tiny_vae).__name__}")
            channels = self.transformer.config.out_channels
            if tiny_vae.latent_channels != channels:
                raise ValueError(f"the tiny VAE decodes {tiny_vae.latent_channels}-channel latents, the transformer "
                                 f"makes {channels}")
        self._preview_decoder = tiny_vae

    def _streaming_decoder(self, device: torch.device) -> WanStreamingDecoder | TinyWanStreamingDecoder:
        tiny = self._preview_decoder
        if tiny is None:
            return WanStreamingDecoder(self.vae)
        if tiny.device != torch.device(device):
            tiny.to(device)
        return TinyWanStreamingDecoder(tiny)

    def streaming_decoder(self) -> WanStreamingDecoder | TinyWanStreamingDecoder:
        """A new block-by-block decoder of one video on the execution device, as ``stream`` decodes (the preview
        decoder if one is set); feed it latents cast to :attr:`decode_dtype`."""
        return self._streaming_decoder(self._execution_device)

    @property
    def decode_dtype(self) -> torch.dtype:
        """The dtype the streaming decoder takes its latents in."""
        return self.vae.dtype if self._preview_decoder is None else self._preview_decoder.dtype

    @property
    def default_video_size(self) -> dict[str, int]:
        """{"num_frames", "height", "width"}: the size recorded at save time (``default_video_size`` in
        ``model_index.json``), else Wan2.1's 81 x 480 x 832."""
        recorded = getattr(self.config, "default_video_size", None) or {}
        return {"num_frames": 81, "height": 480, "width": 832, **recorded}

    @property
    def default_max_sequence_length(self) -> int:
        """Prompt tokens the model was trained with: ``max_sequence_length`` recorded in ``model_index.json`` (the
        demo model: 32), else Wan2.1's 512. Padding rows are zero but still attended to, so the length matters."""
        return int(self.config.get("max_sequence_length", None) or 512)

    # -- prompts ------------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str | list[str],
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """UMT5 embeddings [B * num_videos_per_prompt, max_sequence_length, dim], zero beyond each prompt's tokens.

        ``max_sequence_length``: default :attr:`default_max_sequence_length` (the length the model was trained with).
        """
        max_sequence_length = max_sequence_length or self.default_max_sequence_length
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this pipeline has no tokenizer/text_encoder: pass prompt_embeds instead of a prompt")
        embeds = encode_prompt(self.tokenizer, self.text_encoder, prompt, max_sequence_length,
                               device or self._execution_device, dtype)
        return embeds.repeat_interleave(num_videos_per_prompt, dim=0)

    # -- checks -------------------------------------------------------------------------------------------------------
    def check_inputs(self, request: GenerationRequest) -> None:
        """Every check of a run's request before any work: the one place a run's inputs are validated."""
        r = request
        if sum(x is not None for x in (r.prompt, r.prompt_embeds, r.prompt_schedule)) != 1:
            raise ValueError("pass exactly one of prompt, prompt_embeds or prompt_schedule")
        if sum(x is not None for x in (r.image, r.video, r.context_latents)) > 1:
            raise ValueError("pass at most one of image, video or context_latents")
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if r.height <= 0 or r.width <= 0 or r.height % multiple or r.width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {r.height}x{r.width}")
        if r.num_frames is not None:
            latent_frame_count(r.num_frames, self.vae_scale_factor_temporal)
        elif r.latents is not None:
            raise ValueError("latents (initial noise) cannot be given for an endless stream (num_frames=None)")
        if r.frames_per_block is not None and r.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {r.frames_per_block}")
        if r.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {r.output_type!r}")
        text_dim = self.transformer.config.text_dim
        if r.prompt_embeds is not None and (r.prompt_embeds.ndim != 3 or r.prompt_embeds.shape[-1] != text_dim):
            raise ValueError(f"prompt_embeds must be [B, L, {text_dim}], got {tuple(r.prompt_embeds.shape)}")
        bad = set(r.callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback tensor inputs {sorted(bad)} not in {self._callback_tensor_inputs}")

    def prepare_latents(
        self, batch_size, num_frames, height, width, generator, latents=None, device=None, latent_frames=None
    ) -> torch.Tensor:
        """Initial noise [B, C, 1 + (num_frames - 1) / 4 (or ``latent_frames``), H / 8, W / 8] in float32."""
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            latent_frames if latent_frames is not None
            else latent_frame_count(num_frames, self.vae_scale_factor_temporal),
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=torch.float32, copy=True)  # the caller's tensor stays untouched
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def encode_context(
        self, image=None, video=None, height: int = 480, width: int = 832, device: torch.device | None = None
    ) -> torch.Tensor:
        """An image or a clip -> normalised clean latents [B, 16, 1 + (T - 1) / 4, H / 8, W / 8] (float32).

        Args:
            image: a PIL image, np [H, W, 3] / [B, H, W, 3] or torch [3, H, W] / [B, 3, H, W] (floats in 0..1 or
                uint8); encoded as a one-frame clip.
            video: a list of PIL images, np [T, H, W, 3] / [B, T, H, W, 3] or torch [T, 3, H, W] / [B, T, 3, H, W]
                (floats in 0..1 or uint8), with T = 1 + 4k frames (the Wan VAE's temporal stride).
            height, width: the frames are resized to this size first.
        """
        return encode_context(self.vae, image, video, (height, width), device or self._execution_device)

    def _context(self, image, video, context_latents, height, width, batch, device) -> torch.Tensor | None:
        """The clean context [B, 16, f, H/8, W/8] (float32) of an image-to-video or extension run, or None."""
        if image is not None or video is not None:
            context = self.encode_context(image=image, video=video, height=height, width=width, device=device)
        elif context_latents is not None:
            context = context_latents
            expected = (self.transformer.config.in_channels, height // self.vae_scale_factor_spatial,
                        width // self.vae_scale_factor_spatial)
            if (not isinstance(context, torch.Tensor) or context.ndim != 5 or context.shape[2] < 1
                    or (context.shape[1], *context.shape[3:]) != expected):
                raise ValueError(
                    f"context_latents must be normalised latents [B, {expected[0]}, f, {expected[1]}, {expected[2]}] "
                    f"for a {height}x{width} video, got {tuple(getattr(context, 'shape', ()))}"
                )
            context = context.to(device=device, dtype=torch.float32)
        else:
            return None
        if context.shape[0] != batch:
            if context.shape[0] != 1:
                raise ValueError(f"the context holds {context.shape[0]} videos but the prompts make {batch}")
            context = context.expand(batch, *context.shape[1:])
        return context.contiguous()

    def _cache_policy(self, layout: BlockLayout, window_frames, sink_frames, relative_positions) -> CachePolicy:
        """The run's KV cache policy: full, or a rolling window (an endless video's default)."""
        if layout.endless and window_frames is None:
            window_frames = ENDLESS_WINDOW_FRAMES
            sink_frames = ENDLESS_SINK_FRAMES if sink_frames is None else sink_frames
        if window_frames is None:
            if sink_frames or relative_positions:
                raise ValueError("sink_frames and relative_positions need a rolling cache: pass window_frames too")
            return CachePolicy()
        if window_frames < layout.frames_per_block:
            raise ValueError(
                f"window_frames={window_frames} must hold a whole block ({layout.frames_per_block} latent frames)"
            )
        sink_frames = ENDLESS_SINK_FRAMES if sink_frames is None else sink_frames
        if sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {sink_frames}")
        if relative_positions is None:  # absolute positions are the reference; relative only where they run out
            relative_positions = layout.endless or layout.total_frames > self.transformer.config.rope_max_seq_len
        return CachePolicy(window_frames, sink_frames, relative_positions)

    # -- generation ---------------------------------------------------------------------------------------------------
    def block_layout(self, num_frames: int | None, frames_per_block: int | None = None,
                     context_frames: int = 0) -> BlockLayout:
        """The block layout of a video of ``num_frames`` video frames (1 + 4k, the context's ``context_frames``
        latent frames included; None: endless) as this pipeline makes it: blocks of ``frames_per_block`` (default:
        the transformer's), an independent first frame if the transformer was trained with one."""
        config = self.transformer.config
        return BlockLayout.for_video(num_frames, frames_per_block or config.frames_per_block, context_frames,
                                     bool(config.independent_first_frame), self.vae_scale_factor_temporal)

    def _prompts(self, request: GenerationRequest, device) -> Callable[[Any], PromptHandle]:
        """Text (each distinct one encoded once) or embeddings -> a :class:`PromptHandle` of
        [B * num_videos_per_prompt, L, D] embeddings in the transformer's dtype."""
        handles: dict = {}
        dtype, copies = self.transformer.proj_out.weight.dtype, request.num_videos_per_prompt

        def handle(value) -> PromptHandle:
            if isinstance(value, torch.Tensor):
                return PromptHandle(value.to(device=device, dtype=dtype).repeat_interleave(copies, dim=0))
            key = value if isinstance(value, str) else tuple(value)
            if key not in handles:
                embeds = self.encode_prompt(value, copies, request.max_sequence_length, device, dtype)
                handles[key] = PromptHandle(embeds)
            return handles[key]

        return handle

    def _start(self, request: GenerationRequest, keeps_video: bool) -> _Run:
        """Encode the prompts and the context, lay the video out, check what it will need (``keeps_video``: the whole
        decoded video is kept) and start its session."""
        r, device = request, self._execution_device
        schedule = None if r.prompt_schedule is None else PromptSchedule.coerce(r.prompt_schedule)
        handle = self._prompts(r, device)
        first = handle(schedule.prompts[0] if schedule is not None else
                       (r.prompt_embeds if r.prompt_embeds is not None else r.prompt))
        batch = first.batch_size
        context = self._context(r.image, r.video, r.context_latents, r.height, r.width, batch, device)
        layout = self.block_layout(r.num_frames, r.frames_per_block, 0 if context is None else context.shape[2])
        prompts = [(0, first)]
        switches = [] if schedule is None else schedule.switches_in(layout, self.vae_scale_factor_temporal)[1:]
        for frame, value in switches:
            embeds = handle(value)
            if embeds.embeds.shape[0] != batch or embeds.embeds.shape[2] != first.embeds.shape[2]:
                raise ValueError(f"the prompt switched to at latent frame {frame} has embeddings "
                                 f"{tuple(embeds.embeds.shape)}, the first prompt {tuple(first.embeds.shape)}")
            prompts.append((frame, embeds))
        policy = self._cache_policy(layout, r.window_frames, r.sink_frames, r.relative_positions)
        latent_size = (r.height // self.vae_scale_factor_spatial, r.width // self.vae_scale_factor_spatial)
        check_request(self, RequestPlan.of(layout, policy, batch, latent_size, keeps_video), device)
        geometry, kv_cache = self._new_kv_cache(policy, layout, batch, latent_size, device)
        noise = self._noise(r, layout, batch, latent_size, device)
        sampling = SamplingSettings(r.denoising_timesteps, r.first_block_timesteps)
        session = GenerationSession(self.transformer, self.scheduler, first, layout, noise, context=context,
                                    cache_policy=policy, kv_cache=kv_cache, sampling=sampling)
        latents = None
        if not layout.endless:  # every clean latent of a finite video is kept (output "latent", callbacks)
            latents = torch.zeros(batch, self.transformer.config.in_channels, layout.total_frames, *latent_size,
                                  device=device)
            if context is not None:
                latents[:, :, : context.shape[2]] = context
        return _Run(session, prompts, context, latents, geometry)

    def _noise(self, request: GenerationRequest, layout: BlockLayout, batch: int, latent_size, device) -> NoiseSource:
        """A finite video's noise is drawn whole at the start, an endless one's block by block."""
        channels = self.transformer.config.in_channels
        if layout.endless:
            return NoiseSource.from_generator(request.generator, (batch, channels, *latent_size), device)
        latents = self.prepare_latents(batch, request.num_frames, request.height, request.width, request.generator,
                                       request.latents, device, latent_frames=layout.num_frames)
        return NoiseSource.from_latents(latents, layout.context_frames, request.generator)

    def _generated_blocks(self, run: _Run, request: GenerationRequest) -> Iterator[torch.Tensor]:
        """Drive the session: prompt switches, each block denoised, shown to the callback, finalized; yields the clean
        latents [B, C, f, h, w] of each block."""
        session, switches = run.session, dict(run.prompts[1:])
        while not session.finished:
            start = session.next_block_info.start
            if start in switches:
                session.set_prompt(switches.pop(start), keep_sink=request.keep_sink_on_switch)
            block = session.generate()
            if run.latents is not None:
                frames = slice(block.start_frame, block.start_frame + block.latents.shape[2])
                run.latents[:, :, frames] = block.latents
                if request.callback_on_step_end is not None:
                    self._call_back(run, request, block)
                    block.latents = run.latents[:, :, frames]
            session.finalize(block)
            yield block.latents

    def _call_back(self, run: _Run, request: GenerationRequest, block: RolloutBlock) -> None:
        embeds = [p for frame, p in run.prompts if frame <= block.start_frame][-1].embeds
        local = {"latents": run.latents, "prompt_embeds": embeds}
        kwargs = {name: local[name] for name in request.callback_on_step_end_tensor_inputs}
        result = request.callback_on_step_end(self, block.index, block.timesteps[-1], kwargs) or {}
        if "latents" in result:
            check_finite_inputs(**{"the latents returned by callback_on_step_end": result["latents"]})
            run.latents.copy_(result["latents"])

    def _decoded(self, items: Iterator[tuple[torch.Tensor, bool]], output_type: str, overlap: bool, device):
        """(latents, is a generated block) -> ((latents, is a block), video [B, 3, T, H, W] or None).

        Every decode of a video takes one path (the side stream's rule: the decoder's causal cache must live on the
        stream that decodes)."""
        if output_type == "latent":
            return ((item, None) for item in items)
        decoder = self._streaming_decoder(device)
        dtype = self.decode_dtype
        if overlap:
            return SideStreamDecoder(decoder, device).decode((item, item[0].to(dtype)) for item in items)
        return ((item, decoder.decode_block(item[0].to(dtype))) for item in items)

    def _blocks(self, request: GenerationRequest, overlap_decode: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Shared body of ``__call__`` and ``stream``: yields (clean latents [B, C, f, h, w], decoded video
        [B, 3, T, H, W] or None), first for the context (if any), then per generated block.

        ``overlap_decode``: decode each block on a second CUDA stream beside the next block's transformer passes
        (blocks then come back one block late, the first excepted; see :mod:`.decode_overlap`; elsewhere than CUDA
        the same order without a second stream)."""
        request = self._checked(request)
        self._interrupt = False
        run = self._run = self._start(request, keeps_video=overlap_decode and request.output_type != "latent")
        generated = self._generated_blocks(run, request)
        items = ((latents, True) for latents in generated)
        if run.context is not None:
            items = itertools.chain([(run.context, False)], items)
        num_blocks = run.session.layout.num_blocks
        bar = self.progress_bar(total=num_blocks) if num_blocks else tqdm(**self._endless_bar_config())
        try:
            with bar:
                for (latents, is_block), video in self._decoded(items, request.output_type, overlap_decode,
                                                                self._execution_device):
                    yield latents, video
                    if is_block:
                        bar.update()
                        if self.interrupt:
                            break
        finally:
            generated.close()
            self._run = None
            if self.transformer.cuda_graphs is not None:
                self._kept_kv_cache = (run.geometry, run.session.kv_cache)
            self.maybe_free_model_hooks()

    def _checked(self, request: GenerationRequest) -> GenerationRequest:
        check_arguments(request)
        request = request.with_defaults(self.default_video_size)
        self.check_inputs(request)
        return request

    @torch.no_grad()
    def new_session(self, request: GenerationRequest) -> GenerationSession:
        """The :class:`GenerationSession` that ``stream(**fields of request)`` drives, for a caller that drives it
        itself (a live server: prompts switched, rewound and branched as a person asks). The session starts with the
        request's first prompt; the switches of a ``prompt_schedule`` are left to the caller. Decode its blocks with
        :meth:`streaming_decoder`."""
        return self._start(self._checked(request), keeps_video=False).session

    # -- the state of the run under way (None between runs) -----------------------------------------------------------
    _run: _Run | None = None

    @property
    def kv_cache(self) -> KVCache | None:
        """The KV cache of the run under way (for inspection; None between runs)."""
        return None if self._run is None else self._run.session.kv_cache

    @property
    def latents(self) -> torch.Tensor | None:
        """The clean latents [B, C, F, h, w] of the finite video under way (None between runs and for streams)."""
        return None if self._run is None else self._run.latents

    def _endless_bar_config(self) -> dict:
        config = dict(getattr(self, "_progress_bar_config", {}) or {})
        config.setdefault("disable", False)
        return {**config, "total": None, "unit": "block"}

    def _postprocess(self, video: torch.Tensor, output_type: str):
        """[B, 3, T, H, W] in [-1, 1] -> the requested output format."""
        return self.video_processor.postprocess_video(video.float(), output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        frames_per_block: int | None = None,
        denoising_timesteps: list[float] | None = None,
        first_block_timesteps: list[float] | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int | None = None,
        *,
        image=None,
        video=None,
        context_latents: torch.Tensor | None = None,
        prompt_schedule: PromptSchedule | dict | list | None = None,
        keep_sink_on_switch: bool = False,
        window_frames: int | None = None,
        sink_frames: int | None = None,
        relative_positions: bool | None = None,
    ) -> OneForcingPipelineOutput | tuple:
        """Generate a video.

        Args:
            prompt / prompt_embeds: the text, or its embeddings [B, L, text_dim].
            num_frames: video frames, 1 + 4k (81 = 21 latent frames), the context's frames included (default: the
                recorded ``default_video_size``, else 81).
            height, width: multiples of 16 (default: the recorded size, else 480 x 832).
            frames_per_block: latent frames per block (default: the transformer's ``frames_per_block``; a transformer
                with ``independent_first_frame`` makes latent frame 0 a block of its own).
            denoising_timesteps / first_block_timesteps: per-block timestep lists, un-warped (default: the
                scheduler's, e.g. [1000] for one step; [1000, 750, 500, 250] for four).
            generator: makes the initial and re-noising noise reproducible.
            latents: initial noise [B, 16, F, H/8, W/8] of the frames to generate (F excludes a context's frames).
            output_type: "np", "pil", "pt" or "latent" (normalised latents).
            callback_on_step_end: ``f(pipe, block_index, timestep, tensors) -> dict``, called after each block is
                denoised and before it is committed to the KV cache; returning ``latents`` replaces them. Setting
                ``pipe._interrupt = True`` stops after the current block.
            image: image-to-video: a start image (PIL, np [H, W, 3], torch [3, H, W]; floats 0..1 or uint8), resized to
                height x width, VAE-encoded and committed as clean context; the output begins with its decode.
            video: video extension: a clip of 1 + 4k frames (list of PIL, np [T, H, W, 3], torch [T, 3, H, W]) to
                continue; the output begins with its decode.
            context_latents: already encoded context, normalised latents [B, 16, f, H/8, W/8].
            prompt_schedule: prompts per frame range instead of ``prompt`` (:class:`PromptSchedule`,
                ``{video frame: prompt}`` or a list of ranges; prompts are text or embeddings). Frames are video
                frames; a switch lands on the first block starting at or after it. At a switch the cross-attention
                is replaced and the cached frames' keys/values are recomputed under the new prompt (KV re-cache).
            keep_sink_on_switch: at a switch keep the sink frames' keys/values from the old prompt (rolling cache).
            window_frames / sink_frames: a rolling KV cache of ``sink_frames`` first frames plus the ``window_frames``
                latest (latent frames; default: a full cache; sink 3 when only the window is given), at constant
                memory for any length.
            relative_positions: rotary positions relative to the cache (default: only when absolute positions would
                pass the transformer's table, e.g. endless streams).
        """
        request = GenerationRequest.of(locals())
        if request.num_frames is None:
            request = replace(request, num_frames=self.default_video_size["num_frames"])  # endless needs stream()
        decoded, kept = [], None
        # the whole video is returned at the end: no one waits for a block, so decoding overlaps the next block
        for _, block_video in exclusive_use(self, self._blocks(request, overlap_decode=True)):
            if block_video is not None:
                decoded.append(block_video)
            kept = self.latents if self.latents is not None else kept
        frames = kept if output_type == "latent" else self._postprocess(torch.cat(decoded, dim=2), output_type)
        if not return_dict:
            return (frames,)
        return OneForcingPipelineOutput(frames=frames)

    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int | None = 81,
        height: int | None = None,
        width: int | None = None,
        frames_per_block: int | None = None,
        denoising_timesteps: list[float] | None = None,
        first_block_timesteps: list[float] | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        max_sequence_length: int | None = None,
        *,
        image=None,
        video=None,
        context_latents: torch.Tensor | None = None,
        prompt_schedule: PromptSchedule | dict | list | None = None,
        keep_sink_on_switch: bool = False,
        window_frames: int | None = None,
        sink_frames: int | None = None,
        relative_positions: bool | None = None,
    ) -> Iterator[Any]:
        """Like ``__call__`` but yields each block's decoded frames as soon as they exist.

        Yields the frames of one block in ``output_type`` (np [B, T_block, H, W, 3], pt [B, T_block, 3, H, W], PIL
        lists, or the block's latents for "latent"); concatenated over blocks they equal ``__call__``'s output. With
        a context (``image``, ``video``, ``context_latents``) the first item is the context's decode.

        ``num_frames=None`` streams without end, until the caller stops iterating (``close()`` the generator or
        break out of the loop). It needs a rolling KV cache: by default ``sink_frames=3`` and ``window_frames=12``
        latent frames with relative positions, so memory stays flat; no latents are kept.
        """
        yield from self.stream_request(GenerationRequest.of(locals()))

    @torch.no_grad()
    def stream_request(self, request: GenerationRequest) -> Iterator[Any]:
        """:meth:`stream` of a :class:`GenerationRequest` (its callback is called as ``__call__`` calls it)."""
        for block_latents, block_video in exclusive_use(self, self._blocks(request)):
            yield block_latents if block_video is None else self._postprocess(block_video, request.output_type)


@dataclass(frozen=True)
class GenerationRequest:
    """One run's arguments: those of :meth:`OneForcingPipeline.__call__` (``stream`` takes the same but the callback
    and ``return_dict``)."""

    prompt: str | list[str] | None = None
    num_frames: int | None = 81
    height: int | None = None
    width: int | None = None
    frames_per_block: int | None = None
    denoising_timesteps: list[float] | None = None
    first_block_timesteps: list[float] | None = None
    num_videos_per_prompt: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    output_type: str = "np"
    callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ()
    max_sequence_length: int | None = None
    image: Any = None
    video: Any = None
    context_latents: torch.Tensor | None = None
    prompt_schedule: PromptSchedule | dict | list | None = None
    keep_sink_on_switch: bool = False
    window_frames: int | None = None
    sink_frames: int | None = None
    relative_positions: bool | None = None

    @classmethod
    def of(cls, arguments: dict) -> "GenerationRequest":
        """The request of a ``__call__`` / ``stream`` call from its arguments (``locals()``)."""
        names = {f.name for f in fields(cls)}
        request = cls(**{k: v for k, v in arguments.items() if k in names})
        callback = request.callback_on_step_end
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            request = replace(request, callback_on_step_end_tensor_inputs=tuple(callback.tensor_inputs))
        return request

    def with_defaults(self, size: dict) -> "GenerationRequest":
        """Height and width default to ``size`` (the pipeline's recorded video size)."""
        return replace(self, height=self.height or size["height"], width=self.width or size["width"])


@dataclass
class _Run:
    """The state of one run of the pipeline (dropped at its end)."""

    session: GenerationSession
    prompts: list[tuple[int, PromptHandle]]  # (latent frame, prompt) from that frame on
    context: torch.Tensor | None
    latents: torch.Tensor | None  # [B, C, F, h, w] of a finite video
    geometry: tuple


def encode_prompt(tokenizer, text_encoder: UMT5EncoderModel, prompt: str | list[str], max_sequence_length: int,
                  device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """UMT5 embeddings [B, max_sequence_length, dim] of the prompts (B = how many), zero beyond each prompt's tokens,
    as the models were trained; in ``dtype`` (default: the encoder's), on ``device`` (default: the encoder's)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    tokens = tokenizer(
        [_clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = device or text_encoder.device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    hidden = hidden * mask[..., None].to(hidden.dtype)  # padding rows exactly zero, as the models were trained
    return hidden.to(dtype or text_encoder.dtype)


def encode_context(vae: AutoencoderKLWan, image=None, video=None, size: tuple[int, int] = (480, 832),
                   device: torch.device | None = None) -> torch.Tensor:
    """An image or a clip -> normalised clean latents [B, 16, 1 + (T - 1) / 4, H / 8, W / 8] (float32), the frames
    resized to ``size`` (height, width) first; see :meth:`OneForcingPipeline.encode_context` for the accepted
    forms."""
    if (image is None) == (video is None):
        raise ValueError("pass exactly one of image or video")
    name = "image" if image is not None else "video"
    frames = _as_frames(image, "image", single=True) if image is not None else _as_frames(video, "video")
    processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
    pixels = processor.preprocess_video(frames, height=size[0], width=size[1])  # [B, 3, T, H, W] in -1..1
    latent_frame_count(pixels.shape[2], vae.config.scale_factor_temporal, what=name)
    device = device or vae.device
    return encode_video(vae, pixels.to(device)).to(device=device, dtype=torch.float32)


def _as_frames(value, name: str, single: bool = False):
    """Image/clip input -> what ``VideoProcessor.preprocess_video`` takes (PIL lists, np [B, T, H, W, C] in 0..1,
    torch [B, T, C, H, W] in 0..1)."""
    if isinstance(value, PIL.Image.Image):
        if not single:
            raise ValueError(f"{name} must be a list of frames, got a single PIL image (pass it as image=)")
        return [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} holds no frames")
        if single:
            raise ValueError(f"image must be one image, got a list of {len(value)} (pass a clip as video=)")
        if all(isinstance(v, PIL.Image.Image) for v in value):
            return list(value)
        value = np.stack([np.asarray(v) for v in value]) if all(isinstance(v, np.ndarray) for v in value) \
            else torch.stack([torch.as_tensor(v) for v in value])
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8:
            value = value.astype(np.float32) / 255.0
        layout = "[H, W, 3] or [B, H, W, 3]" if single else "[T, H, W, 3] or [B, T, H, W, 3]"
        if value.ndim not in (3 + (not single), 4 + (not single)) or value.shape[-1] not in (1, 3):
            raise ValueError(f"{name} as a numpy array must be {layout}, got shape {value.shape}")
        if single:
            value = value[None] if value.ndim == 3 else value
            return value[:, None]  # [B, 1, H, W, C]
        return value
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.uint8:
            value = value.float() / 255.0
        layout = "[3, H, W] or [B, 3, H, W]" if single else "[T, 3, H, W] or [B, T, 3, H, W]"
        channels = value.shape[-3] if value.ndim >= 3 else None
        if value.ndim not in (3 + (not single), 4 + (not single)) or channels not in (1, 3):
            raise ValueError(f"{name} as a torch tensor must be {layout} in 0..1, got shape {tuple(value.shape)}")
        value = value.float().cpu()
        if single:
            value = value[None] if value.ndim == 3 else value
            return value[:, None]  # [B, 1, C, H, W]
        return value
    raise TypeError(f"{name} must be a PIL image, a numpy array or a torch tensor, got {type(value).__name__}")
