"""``OneForcingPipeline``: text to video with a one-step (or few-step) causal Wan transformer.

The video is generated block by block (1 latent frame per block = frame-wise, 3 = chunk-wise) through
:func:`causal_rollout`, and each block is decoded as soon as it exists by a streaming Wan VAE decoder that keeps its
causal-convolution cache between blocks (the result equals one full decode). No classifier-free guidance: distilled
models are used with one conditional forward per step.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
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

from .rollout import RolloutBlock, block_sizes, causal_rollout
from .scheduling_one_forcing import OneForcingScheduler
from .transformer_causal_wan import CausalWanTransformer3DModel
from .vae_streaming import WanStreamingDecoder

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class OneForcingPipelineOutput(BaseOutput):
    """``frames``: np [B, T, H, W, 3] in 0..1, pt [B, T, 3, H, W], a list of lists of PIL images, or the normalised
    latents [B, 16, F, H/8, W/8] for ``output_type="latent"``."""

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


def _clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class OneForcingPipeline(DiffusionPipeline):
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
    ):
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
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- prompts ------------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str | list[str],
        num_videos_per_prompt: int = 1,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """UMT5 embeddings [B * num_videos_per_prompt, max_sequence_length, dim], zero beyond each prompt's tokens."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this pipeline has no tokenizer/text_encoder: pass prompt_embeds instead of a prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        device = device or self._execution_device
        tokens = self.tokenizer(
            [_clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask[..., None].to(hidden.dtype)  # padding rows exactly zero, as the models were trained
        hidden = hidden.to(dtype or self.text_encoder.dtype)
        return hidden.repeat_interleave(num_videos_per_prompt, dim=0)

    # -- checks -------------------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, prompt_embeds, num_frames, height, width, frames_per_block, output_type):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt or prompt_embeds")
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        t = self.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(f"num_frames must be 1 + {t}k (e.g. 81), got {num_frames}")
        if frames_per_block is not None and frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if prompt_embeds is not None and (
            prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.transformer.config.text_dim
        ):
            raise ValueError(
                f"prompt_embeds must be [B, L, {self.transformer.config.text_dim}], got {tuple(prompt_embeds.shape)}"
            )

    def prepare_latents(
        self, batch_size, num_frames, height, width, generator, latents=None, device=None
    ) -> torch.Tensor:
        """Initial noise [B, C, 1 + (num_frames - 1) / 4, H / 8, W / 8] in float32."""
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
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

    # -- generation ---------------------------------------------------------------------------------------------------
    def _blocks(
        self,
        prompt,
        num_frames,
        height,
        width,
        frames_per_block,
        denoising_timesteps,
        first_block_timesteps,
        num_videos_per_prompt,
        generator,
        latents,
        prompt_embeds,
        output_type,
        max_sequence_length,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> Iterator[tuple[RolloutBlock, torch.Tensor | None]]:
        """Shared body of ``__call__`` and ``stream``: yields (block, decoded video [B, 3, T, H, W] or None)."""
        self.check_inputs(prompt, prompt_embeds, num_frames, height, width, frames_per_block, output_type)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        bad = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback tensor inputs {sorted(bad)} not in {self._callback_tensor_inputs}")
        self._interrupt = False
        device = self._execution_device
        model_dtype = self.transformer.proj_out.weight.dtype
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, num_videos_per_prompt, max_sequence_length, device, model_dtype)
        else:
            prompt_embeds = prompt_embeds.to(device=device, dtype=model_dtype).repeat_interleave(
                num_videos_per_prompt, dim=0
            )
        batch = prompt_embeds.shape[0]
        noise = self.prepare_latents(batch, num_frames, height, width, generator, latents, device)
        latents = torch.zeros_like(noise)  # filled block by block with the clean latents
        decoder = WanStreamingDecoder(self.vae) if output_type != "latent" else None

        def on_block_denoised(block: RolloutBlock):
            frames = slice(block.start_frame, block.start_frame + block.latents.shape[2])
            latents[:, :, frames] = block.latents
            if callback_on_step_end is None:
                return None
            local = {"latents": latents, "prompt_embeds": prompt_embeds}
            kwargs = {name: local[name] for name in callback_on_step_end_tensor_inputs}
            result = callback_on_step_end(self, block.index, block.timesteps[-1], kwargs) or {}
            if "latents" in result:
                latents.copy_(result["latents"])
            return latents[:, :, frames]

        rollout = causal_rollout(
            self.transformer,
            self.scheduler,
            noise,
            prompt_embeds,
            frames_per_block=frames_per_block,
            denoising_timesteps=denoising_timesteps,
            first_block_timesteps=first_block_timesteps,
            generator=generator,
            on_block_denoised=on_block_denoised,
        )
        num_blocks = len(block_sizes(noise.shape[2], frames_per_block or self.transformer.config.frames_per_block))
        with self.progress_bar(total=num_blocks) as bar:
            for block in rollout:
                video = None
                if decoder is not None:
                    video = decoder.decode_block(block.latents.to(self.vae.dtype))
                yield block, video
                bar.update()
                if self.interrupt:
                    break
        self.latents = latents
        self.maybe_free_model_hooks()

    def _postprocess(self, video: torch.Tensor, output_type: str):
        """[B, 3, T, H, W] in [-1, 1] -> the requested output format."""
        return self.video_processor.postprocess_video(video.float(), output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
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
        max_sequence_length: int = 512,
    ) -> OneForcingPipelineOutput | tuple:
        """Generate a video.

        Args:
            prompt / prompt_embeds: the text, or its embeddings [B, L, text_dim].
            num_frames: video frames, 1 + 4k (81 = 21 latent frames).
            height, width: multiples of 16.
            frames_per_block: latent frames per block (default: the transformer's ``frames_per_block``).
            denoising_timesteps / first_block_timesteps: per-block timestep lists, un-warped (default: the
                scheduler's, e.g. [1000] for one step; [1000, 750, 500, 250] for four).
            generator: makes the initial and re-noising noise reproducible.
            latents: initial noise [B, 16, F, H/8, W/8] instead of drawing it.
            output_type: "np", "pil", "pt" or "latent" (normalised latents).
            callback_on_step_end: ``f(pipe, block_index, timestep, tensors) -> dict``, called after each block is
                denoised and before it is committed to the KV cache; returning ``latents`` replaces them. Setting
                ``pipe._interrupt = True`` stops after the current block.
        """
        decoded = []
        for _, video in self._blocks(
            prompt, num_frames, height, width, frames_per_block, denoising_timesteps, first_block_timesteps,
            num_videos_per_prompt, generator, latents, prompt_embeds, output_type, max_sequence_length,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        ):
            if video is not None:
                decoded.append(video)
        if output_type == "latent":
            frames = self.latents
        else:
            frames = self._postprocess(torch.cat(decoded, dim=2), output_type)
        if not return_dict:
            return (frames,)
        return OneForcingPipelineOutput(frames=frames)

    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        frames_per_block: int | None = None,
        denoising_timesteps: list[float] | None = None,
        first_block_timesteps: list[float] | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        max_sequence_length: int = 512,
    ) -> Iterator[Any]:
        """Like ``__call__`` but yields each block's decoded frames as soon as they exist.

        Yields the frames of one block in ``output_type`` (np [B, T_block, H, W, 3], pt [B, T_block, 3, H, W], PIL
        lists, or the block's latents for "latent"); concatenated over blocks they equal ``__call__``'s output.
        """
        for block, video in self._blocks(
            prompt, num_frames, height, width, frames_per_block, denoising_timesteps, first_block_timesteps,
            num_videos_per_prompt, generator, latents, prompt_embeds, output_type, max_sequence_length, None, (),
        ):
            yield block.latents if video is None else self._postprocess(video, output_type)
