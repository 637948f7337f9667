"""The nodes, declared as plain data (``spec.NodeSpec``) over the plain functions that run them.

Model loader -> ONEFORCING_MODEL; text encoder -> CONDITIONING (one prompt); prompt schedule -> CONDITIONING (one
prompt per frame range); encoder (IMAGE + Wan VAE) -> LATENT (a start image or clip); rollout (model + CONDITIONING,
optionally a context LATENT) -> LATENT (raw Wan VAE space, so ComfyUI's own ``VAEDecode`` also works); decoder (LATENT
+ Wan VAE, or a tiny preview VAE from ``vae_approx``) -> IMAGE.
"""

from __future__ import annotations

import os
from functools import partial

from ..pipelines.attention import ATTENTION_BACKENDS
from .decoding import decode_video
from .encoding import encode_images
from .folders import BUNDLED_DEMO, NO_TINY_VAE, list_models, missing_model, resolve_model
from .model_loading import DTYPE_CHOICES, load_transformer
from .sampling import TIMESTEP_PRESETS, encode_text, generate_latents, schedule_conditioning
from .spec import InputSpec, NodeSpec, OutputSpec

CATEGORY = "OneForcing"
FRAMES_PER_BLOCK_CHOICES = ("model default", "1 (frame-wise)", "3 (chunk-wise)")
MAX_SIZE = 4096
MAX_LENGTH = 4097  # 1 + 4 * 1024 video frames: the rotary time table's 1024 latent frames
MAX_CACHE_FRAMES = 1024  # latent frames


def _file_fingerprint(kind: str, name):
    """Changes when the chosen file or folder changes on disk, so ComfyUI re-runs the node instead of its cache."""
    if not isinstance(name, str):
        return None
    try:
        path = resolve_model(kind, name)
    except (OSError, ValueError):
        return name  # execute() reports the problem
    return name, os.stat(path).st_mtime_ns


# -- node functions: inputs by name, one tuple entry per output ------------------------------------------------------
def model_loader(model_name: str, dtype: str, frames_per_block: str, attention_backend: str,
                 num_attention_heads: int = 0) -> tuple:
    if frames_per_block not in FRAMES_PER_BLOCK_CHOICES:
        raise ValueError(f"frames_per_block must be one of {FRAMES_PER_BLOCK_CHOICES}, got {frames_per_block!r}")
    blocks = 0 if frames_per_block == FRAMES_PER_BLOCK_CHOICES[0] else int(frames_per_block.split()[0])
    return (load_transformer(model_name, dtype, blocks, attention_backend, num_attention_heads),)


def text_encode(text_encoder_name: str, prompt: str, dtype: str) -> tuple:
    return (encode_text(text_encoder_name, prompt, dtype),)


def prompt_schedule(text_encoder_name: str, schedule: str, dtype: str) -> tuple:
    return (schedule_conditioning(text_encoder_name, schedule, dtype),)


def rollout(model, conditioning, seed: int, width: int, height: int, length: int, frames_per_block: int,
            timesteps: str, initial_latent=None, context_latent=None, window_frames: int = 0, sink_frames: int = 3,
            keep_sink_on_switch: bool = False) -> tuple:
    return (generate_latents(model, conditioning, seed, width, height, length, frames_per_block, timesteps,
                             initial_latent, context_latent, window_frames, sink_frames, keep_sink_on_switch),)


def encode(images, vae_name: str, width: int, height: int, vae=None) -> tuple:
    return (encode_images(images, vae_name, width, height, vae),)


def decode(samples, vae_name: str, vae=None, tiny_vae: str = NO_TINY_VAE) -> tuple:
    return (decode_video(samples, vae_name, vae, tiny_vae),)


# -- queue-time checks: a model that is not there is named when the prompt is queued, not when its node runs ----------
def _check_transformer(model_name) -> str | None:
    return missing_model("diffusion_models", model_name)


def _check_text_encoder(text_encoder_name) -> str | None:
    return missing_model("text_encoders", text_encoder_name)


def _check_vae(vae_name) -> str | None:
    # the bundled demo's VAE is checked when it runs: a connected VAE (unknown at queue time) replaces it
    return None if vae_name == BUNDLED_DEMO else missing_model("vae", vae_name)


def _check_decoders(vae_name, tiny_vae=NO_TINY_VAE) -> str | None:
    return _check_vae(vae_name) or (None if tiny_vae == NO_TINY_VAE else missing_model("vae_approx", tiny_vae))


def _decode_fingerprint(vae_name=None, tiny_vae=NO_TINY_VAE, **_):
    wan = _file_fingerprint("vae", vae_name)
    return wan if tiny_vae == NO_TINY_VAE else (wan, _file_fingerprint("vae_approx", tiny_vae))


# -- declarations ----------------------------------------------------------------------------------------------------
MODEL_LOADER = NodeSpec(
    node_id="OneForcingModelLoader",
    display_name="One-Forcing Model Loader",
    category=f"{CATEGORY}/loaders",
    description="Loads a causal Wan2.1 transformer (One-Forcing / Self-Forcing .pt, ComfyUI or original .safetensors, "
                "diffusers folder) from models/diffusion_models for the One-Forcing rollout.",
    inputs=(
        InputSpec("model_name", "COMBO", "A file or model folder in models/diffusion_models, or the bundled demo.",
                  default=BUNDLED_DEMO, options=partial(list_models, "diffusion_models")),
        InputSpec("dtype", "COMBO", "Weight dtype; default = bfloat16 on a GPU, float32 on the CPU.",
                  default="default", options=DTYPE_CHOICES),
        InputSpec("frames_per_block", "COMBO",
                  "Latent frames generated per autoregressive block; 'model default' reads the model's config "
                  "(single files do not record it and default to frame-wise).",
                  default=FRAMES_PER_BLOCK_CHOICES[0], options=FRAMES_PER_BLOCK_CHOICES),
        InputSpec("attention_backend", "COMBO", "PyTorch attention backend; auto lets PyTorch choose.",
                  default="auto", options=ATTENTION_BACKENDS),
        InputSpec("num_attention_heads", "INT",
                  "Attention heads of a single file that does not record them; 0 = read from the file (a file "
                  "that records none and is no released Wan2.1 model is refused).",
                  optional=True, default=0, min=0, max=1024),
    ),
    outputs=(OutputSpec("ONEFORCING_MODEL", "model", "The causal transformer, managed by ComfyUI."),),
    function=model_loader,
    fingerprint=lambda model_name=None, **_: _file_fingerprint("diffusion_models", model_name),
    validate=_check_transformer,
)

# shared by the two nodes that run the UMT5 text encoder
TEXT_ENCODER_INPUT = InputSpec("text_encoder_name", "COMBO",
                               "A UMT5 file or folder in models/text_encoders, or the bundled demo.",
                               default=BUNDLED_DEMO, options=partial(list_models, "text_encoders"))
ENCODER_DTYPE_INPUT = InputSpec("dtype", "COMBO", "Encoder dtype; default = bfloat16 on a GPU, float32 on the CPU.",
                                default="default", options=DTYPE_CHOICES)


def _text_encoder_fingerprint(text_encoder_name=None, **_):
    return _file_fingerprint("text_encoders", text_encoder_name)


TEXT_ENCODE = NodeSpec(
    node_id="OneForcingTextEncode",
    display_name="One-Forcing Text Encode (UMT5)",
    category=f"{CATEGORY}/conditioning",
    description="Encodes a prompt with the UMT5 text encoder from models/text_encoders (ComfyUI's umt5_xxl single "
                "file, a transformers folder, or the bundled demo). ComfyUI's CLIPLoader (type wan) + "
                "CLIPTextEncode give the same kind of CONDITIONING and keep the encoder loaded between prompts.",
    inputs=(
        TEXT_ENCODER_INPUT,
        InputSpec("prompt", "STRING", "What the video shows.", default="", multiline=True),
        ENCODER_DTYPE_INPUT,
    ),
    outputs=(OutputSpec("CONDITIONING", "conditioning", "UMT5 embeddings [1, 512, dim], zero after the prompt."),),
    function=text_encode,
    fingerprint=_text_encoder_fingerprint,
    validate=_check_text_encoder,
)

PROMPT_SCHEDULE = NodeSpec(
    node_id="OneForcingPromptSchedule",
    display_name="One-Forcing Prompt Schedule (UMT5)",
    category=f"{CATEGORY}/conditioning",
    description="Several prompts over one video, one per line as 'FRAME: prompt' (0-based video frames, as the "
                "CLI's --prompt FRAME:text; 'START-END: prompt' with END exclusive also works). Each prompt runs "
                "from its frame to the next line's; the first line starts at 0. A switch takes effect at the first "
                "block starting at or after its frame, and the KV cache is recomputed under the new prompt. Feed it "
                "to One-Forcing Autoregressive Rollout.",
    inputs=(
        TEXT_ENCODER_INPUT,
        InputSpec("schedule", "STRING", "One 'FRAME: prompt' per line, in frame order, starting at 0 (e.g. "
                  "'0: a cat walks' then '80: a cat sits'). Blank lines and lines starting with # are skipped.",
                  default="0: ", multiline=True),
        ENCODER_DTYPE_INPUT,
    ),
    outputs=(OutputSpec("CONDITIONING", "conditioning", "One UMT5 embedding [1, 512, dim] per range, each marked "
                        "with its frames; only the One-Forcing rollout reads the schedule."),),
    function=prompt_schedule,
    fingerprint=_text_encoder_fingerprint,
    validate=_check_text_encoder,
)

ENCODE = NodeSpec(
    node_id="OneForcingEncode",
    display_name="One-Forcing Encode (Wan VAE)",
    category=f"{CATEGORY}/latent",
    description="Encodes a start image (image-to-video) or a clip of 1 + 4k frames (video extension) with the "
                "Wan2.1 VAE, resized to width x height, for the rollout's context_latent. ComfyUI's VAEEncode with "
                "the Wan VAE gives the same kind of LATENT.",
    inputs=(
        InputSpec("images", "IMAGE", "One image, or a clip of 1 + 4k frames (1, 5, 9, ...)."),
        InputSpec("vae_name", "COMBO", "A Wan2.1 VAE in models/vae, or the bundled demo's; ignored when a VAE is "
                  "connected.", default=BUNDLED_DEMO, options=partial(list_models, "vae")),
        InputSpec("width", "INT", "Width to resize to, in pixels, a multiple of 16 (the video's width).",
                  default=832, min=16, max=MAX_SIZE, step=16),
        InputSpec("height", "INT", "Height to resize to, in pixels, a multiple of 16 (the video's height).",
                  default=480, min=16, max=MAX_SIZE, step=16),
        InputSpec("vae", "VAE", "Optional: ComfyUI's Wan2.1 VAE (from VAELoader) instead of vae_name.",
                  optional=True),
    ),
    outputs=(OutputSpec("LATENT", "latent", "Wan2.1 latents [1, 16, 1 + (T-1)/4, H/8, W/8], raw VAE space."),),
    function=encode,
    fingerprint=lambda vae_name=None, **_: _file_fingerprint("vae", vae_name),
    validate=_check_vae,
)

ROLLOUT = NodeSpec(
    node_id="OneForcingRollout",
    display_name="One-Forcing Autoregressive Rollout",
    category=f"{CATEGORY}/sampling",
    description="Generates the video latents block by block with the KV cache (one denoising step per block by "
                "default). Takes one prompt or a prompt schedule; an optional context latent (encoded start image "
                "or clip) is continued; a rolling cache window makes videos longer than the model was trained for. "
                "Progress per block; Cancel stops between blocks. The LATENT is in Wan VAE space, so ComfyUI's "
                "VAEDecode with the Wan VAE decodes it too.",
    inputs=(
        InputSpec("model", "ONEFORCING_MODEL", "From One-Forcing Model Loader."),
        InputSpec("conditioning", "CONDITIONING", "One prompt (One-Forcing Text Encode, or CLIPTextEncode with a wan "
                  "CLIP) or a prompt schedule (One-Forcing Prompt Schedule)."),
        InputSpec("seed", "INT", "Seed of the initial and re-noising noise.", default=0, min=0,
                  max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
        InputSpec("width", "INT", "Video width in pixels, a multiple of 16; 0 = the model's own size (what its "
                  "pipeline recorded: 128 for the bundled demo; 832 for Wan2.1 single files).", default=0, min=0,
                  max=MAX_SIZE, step=16),
        InputSpec("height", "INT", "Video height in pixels, a multiple of 16; 0 = the model's own size (what its "
                  "pipeline recorded: 128 for the bundled demo; 480 for Wan2.1 single files).", default=0, min=0,
                  max=MAX_SIZE, step=16),
        InputSpec("length", "INT", "Video frames, 1 + 4k (81 = 21 latent frames), a context's frames included.",
                  default=81, min=1, max=MAX_LENGTH, step=4),
        InputSpec("frames_per_block", "INT", "Latent frames per block; 0 = the loader's setting.", default=0, min=0,
                  max=64),
        InputSpec("timesteps", "COMBO", "Denoising steps per block.", default="one step",
                  options=tuple(TIMESTEP_PRESETS)),
        InputSpec("initial_latent", "LATENT", "Optional: an empty video latent whose shape sets batch, length and "
                  "size (width/height/length are then ignored).", optional=True),
        InputSpec("context_latent", "LATENT", "Optional: clean context to continue, raw Wan VAE latents (One-Forcing "
                  "Encode or VAEEncode of a start image or clip; width/height then come from it). The output begins "
                  "with it.", optional=True),
        InputSpec("window_frames", "INT", "Rolling KV cache: the latest latent frames kept (besides the sink); 0 = "
                  "keep every frame. Set it to run past the length the model was trained for (e.g. 18 with sink 3 "
                  "for a model trained on 21 latent frames).", optional=True, default=0, min=0,
                  max=MAX_CACHE_FRAMES),
        InputSpec("sink_frames", "INT", "Rolling KV cache: the first latent frames kept for the whole video "
                  "(attention sink); used only with window_frames > 0.", optional=True, default=3, min=0,
                  max=MAX_CACHE_FRAMES),
        InputSpec("keep_sink_on_switch", "BOOLEAN", "At a prompt switch keep the sink frames as computed under the "
                  "old prompt (only with window_frames > 0); off recomputes them under the new prompt.",
                  optional=True, default=False),
    ),
    outputs=(OutputSpec("LATENT", "latent", "Wan2.1 video latents [B, 16, F, H/8, W/8], raw VAE space."),),
    function=rollout,
)

DECODE = NodeSpec(
    node_id="OneForcingDecode",
    display_name="One-Forcing Decode (streaming Wan VAE)",
    category=f"{CATEGORY}/latent",
    description="Decodes video latents to frames with the Wan2.1 VAE, one latent frame at a time through the causal "
                "decoder cache (flat memory in the video length). Uses the connected VAE if any, else vae_name. For "
                "fast previews pick a tiny VAE (TAEHV taew2_1 in models/vae_approx): it decodes instead, with the "
                "same frame count and size, and the Wan VAE only supplies its latent statistics.",
    inputs=(
        InputSpec("samples", "LATENT", "Wan2.1 video latents (from the rollout or any Wan sampler)."),
        InputSpec("vae_name", "COMBO", "A Wan2.1 VAE in models/vae, or the bundled demo's; ignored when a VAE is "
                  "connected.", default=BUNDLED_DEMO, options=partial(list_models, "vae")),
        InputSpec("vae", "VAE", "Optional: ComfyUI's Wan2.1 VAE (from VAELoader) instead of vae_name.",
                  optional=True),
        InputSpec("tiny_vae", "COMBO", "Optional fast preview decoder: a TAEHV file for Wan2.1 (taew2_1) in "
                  "models/vae_approx. 'none' decodes with the Wan VAE. Otherwise the tiny VAE decodes and the Wan "
                  "VAE's latent statistics (vae_name's config.json; Wan2.1's for single files and a connected VAE) "
                  "convert the LATENT to the space it expects; no Wan VAE weights are loaded.",
                  optional=True, default=NO_TINY_VAE, options=partial(list_models, "vae_approx")),
    ),
    outputs=(OutputSpec("IMAGE", "images", "Frames [T, H, W, 3] in 0..1 (batch videos one after another)."),),
    function=decode,
    fingerprint=_decode_fingerprint,
    validate=_check_decoders,
)

NODE_SPECS: tuple[NodeSpec, ...] = (MODEL_LOADER, TEXT_ENCODE, PROMPT_SCHEDULE, ROLLOUT, ENCODE, DECODE)
