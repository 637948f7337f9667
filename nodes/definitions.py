"""The nodes: one ComfyUI V3 class each (``comfy_api.latest.io``), listed in :data:`NODES`.

Model loader -> ONEFORCING_MODEL; LoRA (ONEFORCING_MODEL + a LoRA file) -> ONEFORCING_MODEL with one more LoRA; text
encoder -> CONDITIONING (one prompt); prompt schedule -> CONDITIONING (one prompt per frame range); encoder (IMAGE +
Wan VAE) -> LATENT (a start image or clip); rollout (model + CONDITIONING, optionally a context LATENT) -> LATENT (raw
Wan VAE space, so ComfyUI's own ``VAEDecode`` also works); decoder (LATENT + Wan VAE, or a tiny preview VAE from
``vae_approx``) -> IMAGE. A node's ``execute`` calls the plain function of ``model_loading``, ``sampling``,
``encoding`` or ``decoding`` that does its work.

Inside a running ComfyUI the classes derive from ``io.ComfyNode`` (ComfyUI imports ``comfy_api.latest`` before it loads
custom nodes). Elsewhere (tests, scripts) ComfyUI is not imported, the classes are plain classes whose ``execute``,
``validate_inputs`` and ``fingerprint_inputs`` run as they are, and only ``define_schema`` needs ComfyUI.
"""

from __future__ import annotations

import os
import sys

from ..pipelines.attention import ATTENTION_BACKENDS
from ..pipelines.presets import DTYPE_CHOICES, TIMESTEP_PRESETS
from .decoding import decode_video
from .encoding import SIZE_MULTIPLE, encode_images
from .folders import BUNDLED_DEMO, NO_TINY_VAE, list_models, missing_model, resolve_model
from .model_loading import add_lora, load_transformer
from .sampling import (NOISE_MODES, WHOLE_VIDEO_NOISE, RolloutRequest, encode_text, generate_latents,
                       schedule_conditioning)
from .workflow_inputs import install_workflow_inputs

_COMFY_API = sys.modules.get("comfy_api.latest")  # present only inside a running ComfyUI
io = _COMFY_API.io if _COMFY_API is not None else None
ComfyNode = io.ComfyNode if io is not None else object

CATEGORY = "OneForcing"
MODEL_TYPE = "ONEFORCING_MODEL"
MAX_SIZE = 4096
MAX_LENGTH = 4097  # 1 + 4 * 1024 video frames: the rotary time table's 1024 latent frames
MAX_CACHE_FRAMES = 1024  # latent frames
TEXT_ENCODER_TOOLTIP = "A UMT5 file or folder in models/text_encoders, or the bundled demo."
DTYPE_TOOLTIP = ("default = bfloat16 on a GPU, float32 on the CPU; fp8_e4m3fn keeps the weights in fp8 (about half the "
                 "memory of bfloat16) and computes in the default dtype.")
VAE_NAME_TOOLTIP = "A Wan2.1 VAE in models/vae, or the bundled demo's; ignored when a VAE is connected."
VAE_TOOLTIP = "Optional: ComfyUI's Wan2.1 VAE (from VAELoader) instead of vae_name."


def file_fingerprint(kind: str, name):
    """Changes when the chosen file or folder changes on disk, so ComfyUI re-runs the node instead of its cache."""
    if not isinstance(name, str):
        return None
    try:
        path = resolve_model(kind, name)
    except (OSError, ValueError):
        return name  # execute() reports the problem
    return name, os.stat(path).st_mtime_ns


def queue_check(problem: str | None) -> bool | str:
    """ComfyUI's ``validate_inputs`` answer: True, or the reason the prompt is refused when it is queued."""
    return True if problem is None else problem


class OneForcingModelLoader(ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneForcingModelLoader",
            display_name="One-Forcing Model Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a causal Wan2.1 transformer (One-Forcing / Self-Forcing .pt, ComfyUI or original "
                        ".safetensors, diffusers folder) from models/diffusion_models for the One-Forcing rollout.",
            inputs=[
                io.Combo.Input("model_name", options=list_models("diffusion_models"), default=BUNDLED_DEMO,
                               tooltip="A file or model folder in models/diffusion_models, or the bundled demo."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="default",
                               tooltip=f"Weight dtype; {DTYPE_TOOLTIP}"),
                io.Combo.Input("attention_backend", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="PyTorch attention backend; auto lets PyTorch choose."),
                io.Int.Input("num_attention_heads", optional=True, default=0, min=0, max=1024,
                             tooltip="Attention heads of a single file that does not record them; 0 = read from the "
                                     "file (a file that records none and is no released Wan2.1 model is refused)."),
            ],
            outputs=[io.Custom(MODEL_TYPE).Output(display_name="model",
                                                  tooltip="The causal transformer, managed by ComfyUI.")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str, attention_backend: str, num_attention_heads: int = 0):
        return (load_transformer(model_name, dtype, attention_backend, num_attention_heads),)

    @classmethod
    def validate_inputs(cls, model_name):
        return queue_check(missing_model("diffusion_models", model_name))

    @classmethod
    def fingerprint_inputs(cls, model_name=None, **_):
        return file_fingerprint("diffusion_models", model_name)


class OneForcingLora(ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneForcingLora",
            display_name="One-Forcing LoRA",
            category=f"{CATEGORY}/loaders",
            description="Applies a Wan2.1 LoRA from models/loras (diffusers, original Wan, ComfyUI or kohya/musubi "
                        "layout; .safetensors only) to a One-Forcing model at a strength. Chain several to stack "
                        "them. The model it is given stays as it was, so a graph can run the same model with and "
                        "without the LoRA; a LoRA made for another model is refused naming the first key that does "
                        "not fit.",
            inputs=[
                io.Custom(MODEL_TYPE).Input("model", tooltip="From One-Forcing Model Loader or another One-Forcing "
                                                             "LoRA."),
                io.Combo.Input("lora_name", options=list_models("loras"),
                               tooltip="A .safetensors LoRA file in models/loras (or a bundled demo LoRA)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA acts: 0 leaves the model as it is, negative values "
                                       "invert it."),
            ],
            outputs=[io.Custom(MODEL_TYPE).Output(display_name="model",
                                                  tooltip="The same model with this LoRA added (weights shared).")],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float):
        return (add_lora(model, lora_name, strength),)

    @classmethod
    def validate_inputs(cls, lora_name):
        return queue_check(missing_model("loras", lora_name))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **_):
        return file_fingerprint("loras", lora_name)


class OneForcingTextEncode(ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneForcingTextEncode",
            display_name="One-Forcing Text Encode (UMT5)",
            category=f"{CATEGORY}/conditioning",
            description="Encodes a prompt with the UMT5 text encoder from models/text_encoders (ComfyUI's umt5_xxl "
                        "single file, a transformers folder, or the bundled demo). ComfyUI's CLIPLoader (type wan) + "
                        "CLIPTextEncode give the same kind of CONDITIONING and keep the encoder loaded between "
                        "prompts.",
            inputs=[
                io.Combo.Input("text_encoder_name", options=list_models("text_encoders"), default=BUNDLED_DEMO,
                               tooltip=TEXT_ENCODER_TOOLTIP),
                io.String.Input("prompt", default="", multiline=True, tooltip="What the video shows."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="default",
                               tooltip=f"Encoder dtype; {DTYPE_TOOLTIP}"),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="UMT5 embeddings [1, 512, dim], zero after the prompt.")],
        )

    @classmethod
    def execute(cls, text_encoder_name: str, prompt: str, dtype: str):
        return (encode_text(text_encoder_name, prompt, dtype),)

    @classmethod
    def validate_inputs(cls, text_encoder_name):
        return queue_check(missing_model("text_encoders", text_encoder_name))

    @classmethod
    def fingerprint_inputs(cls, text_encoder_name=None, **_):
        return file_fingerprint("text_encoders", text_encoder_name)


class OneForcingPromptSchedule(ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneForcingPromptSchedule",
            display_name="One-Forcing Prompt Schedule (UMT5)",
            category=f"{CATEGORY}/conditioning",
            description="Several prompts over one video, one per line as 'FRAME: prompt' (0-based video frames, as "
                        "the CLI's --prompt FRAME:text; 'START-END: prompt' with END exclusive also works). Each "
                        "prompt runs from its frame to the next line's; the first line starts at 0. A switch takes "
                        "effect at the first block starting at or after its frame, and the KV cache is recomputed "
                        "under the new prompt. Feed it to One-Forcing Autoregressive Rollout.",
            inputs=[
                io.Combo.Input("text_encoder_name", options=list_models("text_encoders"), default=BUNDLED_DEMO,
                               tooltip=TEXT_ENCODER_TOOLTIP),
                io.String.Input("schedule", default="0: ", multiline=True,
                                tooltip="One 'FRAME: prompt' per line, in frame order, starting at 0 (e.g. '0: a cat "
                                        "walks' then '80: a cat sits'). Blank lines and lines starting with # are "
                                        "skipped. Or paste a schedule JSON (the live studio's download, as "
                                        "--prompt-schedule reads)."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="default",
                               tooltip=f"Encoder dtype; {DTYPE_TOOLTIP}"),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="One UMT5 embedding [1, 512, dim] per range, each marked with its "
                                                    "frames; only the One-Forcing rollout reads the schedule.")],
        )

    @classmethod
    def execute(cls, text_encoder_name: str, schedule: str, dtype: str):
        return (schedule_conditioning(text_encoder_name, schedule, dtype),)

    @classmethod
    def validate_inputs(cls, text_encoder_name):
        return queue_check(missing_model("text_encoders", text_encoder_name))

    @classmethod
    def fingerprint_inputs(cls, text_encoder_name=None, **_):
        return file_fingerprint("text_encoders", text_encoder_name)


class OneForcingRollout(ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneForcingRollout",
            display_name="One-Forcing Autoregressive Rollout",
            category=f"{CATEGORY}/sampling",
            description="Generates the video latents block by block with the KV cache (one denoising step per block "
                        "by default). Takes one prompt or a prompt schedule; an optional context latent (encoded "
                        "start image or clip) is continued; a rolling cache window makes videos longer than the model "
                        "was trained for. Progress per block; Cancel stops between blocks. The LATENT is in Wan VAE "
                        "space, so ComfyUI's VAEDecode with the Wan VAE decodes it too.",
            inputs=[
                io.Custom(MODEL_TYPE).Input("model", tooltip="From One-Forcing Model Loader."),
                io.Conditioning.Input("conditioning", tooltip="One prompt (One-Forcing Text Encode, or CLIPTextEncode "
                                      "with a wan CLIP) or a prompt schedule (One-Forcing Prompt Schedule)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial and re-noising noise."),
                io.Int.Input("width", default=0, min=0, max=MAX_SIZE, step=16,
                             tooltip="Video width in pixels, a multiple of 16; 0 = the model's own size (what its "
                                     "pipeline recorded: 128 for the bundled demo; 832 for Wan2.1 single files)."),
                io.Int.Input("height", default=0, min=0, max=MAX_SIZE, step=16,
                             tooltip="Video height in pixels, a multiple of 16; 0 = the model's own size (what its "
                                     "pipeline recorded: 128 for the bundled demo; 480 for Wan2.1 single files)."),
                io.Int.Input("length", default=81, min=1, max=MAX_LENGTH, step=4,
                             tooltip="Video frames, 1 + 4k (81 = 21 latent frames), a context's frames included."),
                io.Int.Input("frames_per_block", default=0, min=0, max=64,
                             tooltip="Latent frames per block (1 = frame-wise, 3 = chunk-wise); 0 = the model's own "
                                     "setting (its config; single files do not record it and default to "
                                     "frame-wise)."),
                io.Combo.Input("timesteps", options=list(TIMESTEP_PRESETS), default="one step",
                               tooltip="Denoising steps per block."),
                io.Latent.Input("initial_latent", optional=True,
                                tooltip="Optional: an empty video latent whose shape sets batch, length and size "
                                        "(width/height/length are then ignored)."),
                io.Latent.Input("context_latent", optional=True,
                                tooltip="Optional: clean context to continue, raw Wan VAE latents (One-Forcing Encode "
                                        "or VAEEncode of a start image or clip; width/height then come from it). The "
                                        "output begins with it."),
                io.Int.Input("window_frames", optional=True, default=0, min=0, max=MAX_CACHE_FRAMES,
                             tooltip="Rolling KV cache: the latest latent frames kept (besides the sink); 0 = keep "
                                     "every frame (with noise per block: the endless stream's window). Set it to run "
                                     "past the length the model was trained for (e.g. 18 with sink 3 for a model "
                                     "trained on 21 latent frames)."),
                io.Int.Input("sink_frames", optional=True, default=3, min=0, max=MAX_CACHE_FRAMES,
                             tooltip="Rolling KV cache: the first latent frames kept for the whole video (attention "
                                     "sink); used only with window_frames > 0."),
                io.Boolean.Input("keep_sink_on_switch", optional=True, default=False,
                                 tooltip="At a prompt switch keep the sink frames as computed under the old prompt "
                                         "(only with window_frames > 0); off recomputes them under the new prompt."),
                io.Combo.Input("noise", options=list(NOISE_MODES), default=WHOLE_VIDEO_NOISE, optional=True,
                               tooltip="whole video: every frame's noise drawn from the seed at the start. per "
                                       "block: drawn block by block, as an endless stream (oneforcing generate "
                                       "--num-frames endless) and the live studio make it, with their rolling KV "
                                       "cache when window_frames is 0: a studio branch's schedule JSON, its seed "
                                       "and length = the schedule's end give the branch again."),
            ],
            outputs=[io.Latent.Output(display_name="latent",
                                      tooltip="Wan2.1 video latents [B, 16, F, H/8, W/8], raw VAE space.")],
        )

    @classmethod
    def execute(cls, model, conditioning, seed: int, width: int, height: int, length: int, frames_per_block: int,
                timesteps: str, initial_latent=None, context_latent=None, window_frames: int = 0,
                sink_frames: int = 3, keep_sink_on_switch: bool = False, noise: str = WHOLE_VIDEO_NOISE):
        request = RolloutRequest(conditioning, seed, width, height, length, frames_per_block, timesteps,
                                 initial_latent, context_latent, window_frames, sink_frames, keep_sink_on_switch,
                                 noise)
        return (generate_latents(model, request),)


class OneForcingEncode(ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneForcingEncode",
            display_name="One-Forcing Encode (Wan VAE)",
            category=f"{CATEGORY}/latent",
            description="Encodes a start image (image-to-video) or a clip of 1 + 4k frames (video extension) with the "
                        "Wan2.1 VAE, resized to width x height, for the rollout's context_latent. ComfyUI's VAEEncode "
                        "with the Wan VAE gives the same kind of LATENT.",
            inputs=[
                io.Image.Input("images", tooltip="One image, or a clip of 1 + 4k frames (1, 5, 9, ...)."),
                io.Combo.Input("vae_name", options=list_models("vae"), default=BUNDLED_DEMO, tooltip=VAE_NAME_TOOLTIP),
                io.Int.Input("width", default=832, min=SIZE_MULTIPLE, max=MAX_SIZE, step=SIZE_MULTIPLE,
                             tooltip="Width to resize to, in pixels, a multiple of 16 (the video's width)."),
                io.Int.Input("height", default=480, min=SIZE_MULTIPLE, max=MAX_SIZE, step=SIZE_MULTIPLE,
                             tooltip="Height to resize to, in pixels, a multiple of 16 (the video's height)."),
                io.Vae.Input("vae", optional=True, tooltip=VAE_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Wan2.1 latents [1, 16, 1 + (T-1)/4, H/8, W/8], "
                                                                     "raw VAE space.")],
        )

    @classmethod
    def execute(cls, images, vae_name: str, width: int, height: int, vae=None):
        return (encode_images(images, vae_name, width, height, vae),)

    @classmethod
    def validate_inputs(cls, vae_name):
        # the bundled demo's VAE is checked when it runs: a connected VAE (unknown at queue time) replaces it
        return queue_check(None if vae_name == BUNDLED_DEMO else missing_model("vae", vae_name))

    @classmethod
    def fingerprint_inputs(cls, vae_name=None, **_):
        return file_fingerprint("vae", vae_name)


class OneForcingDecode(ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneForcingDecode",
            display_name="One-Forcing Decode (streaming Wan VAE)",
            category=f"{CATEGORY}/latent",
            description="Decodes video latents to frames with the Wan2.1 VAE, one latent frame at a time through the "
                        "causal decoder cache (flat memory in the video length). Uses the connected VAE if any, else "
                        "vae_name. For fast previews pick a tiny VAE (TAEHV taew2_1 in models/vae_approx): it decodes "
                        "instead, with the same frame count and size, and the Wan VAE only supplies its latent "
                        "statistics.",
            inputs=[
                io.Latent.Input("samples", tooltip="Wan2.1 video latents (from the rollout or any Wan sampler)."),
                io.Combo.Input("vae_name", options=list_models("vae"), default=BUNDLED_DEMO, tooltip=VAE_NAME_TOOLTIP),
                io.Vae.Input("vae", optional=True, tooltip=VAE_TOOLTIP),
                io.Combo.Input("tiny_vae", options=list_models("vae_approx"), default=NO_TINY_VAE, optional=True,
                               tooltip="Optional fast preview decoder: a TAEHV file for Wan2.1 (taew2_1) in "
                                       "models/vae_approx. 'none' decodes with the Wan VAE. Otherwise the tiny VAE "
                                       "decodes and the Wan VAE's latent statistics (vae_name's config.json; Wan2.1's "
                                       "for single files and a connected VAE) convert the LATENT to the space it "
                                       "expects; no Wan VAE weights are loaded."),
            ],
            outputs=[io.Image.Output(display_name="images",
                                     tooltip="Frames [T, H, W, 3] in 0..1 (batch videos one after another).")],
        )

    @classmethod
    def execute(cls, samples, vae_name: str, vae=None, tiny_vae: str = NO_TINY_VAE):
        return (decode_video(samples, vae_name, vae, tiny_vae),)

    @classmethod
    def validate_inputs(cls, vae_name, tiny_vae=NO_TINY_VAE):
        problem = OneForcingEncode.validate_inputs(vae_name)
        if problem is True and tiny_vae != NO_TINY_VAE:
            problem = queue_check(missing_model("vae_approx", tiny_vae))
        return problem

    @classmethod
    def fingerprint_inputs(cls, vae_name=None, tiny_vae=NO_TINY_VAE, **_):
        wan = file_fingerprint("vae", vae_name)
        return wan if tiny_vae == NO_TINY_VAE else (wan, file_fingerprint("vae_approx", tiny_vae))


NODES = [OneForcingModelLoader, OneForcingLora, OneForcingTextEncode, OneForcingPromptSchedule, OneForcingRollout,
         OneForcingEncode, OneForcingDecode]
"""Every node of the package, in menu order; a new node is its class and an entry here."""


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: copies the workflows' input files into ComfyUI's input folder and lists the nodes."""
    if io is None:
        raise RuntimeError("the One-Forcing nodes load inside ComfyUI only (comfy_api.latest was not imported before "
                           "them)")

    class OneForcingExtension(_COMFY_API.ComfyExtension):
        async def get_node_list(self) -> list:
            return list(NODES)

    install_workflow_inputs()  # the image-to-video workflow's start image, into ComfyUI's input/
    return OneForcingExtension()
