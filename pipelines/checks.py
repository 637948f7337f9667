"""Checks made before and during a generation request, so that a request that cannot work fails at once, with the
numbers, instead of after minutes or with garbage:

- non-finite values (NaN, Inf) in weights, in the caller's tensors, and in the first block's output, with where they
  came from (:func:`check_finite_weights`, :func:`check_finite_inputs`, :func:`check_first_block`);
- lengths past the transformer's rotary table and sizes whose KV cache, latents and decode do not fit in the device's
  free memory (:func:`check_request`, from a :class:`RequestPlan`);
- one request at a time per pipeline (:func:`exclusive_use`).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

GIB = 1024**3


TENSOR_ARGUMENTS = ("prompt_embeds", "latents", "image", "video", "context_latents")
"""The request's arguments that must hold finite values where given as tensors or arrays."""


class ConcurrentUseError(RuntimeError):
    """A pipeline was asked for a second video while one is still being generated (another thread, or an unfinished
    ``stream()``)."""


class NonFiniteError(ValueError):
    """NaN or Inf values where a video is made; the message says where they came from."""


# -- non-finite values ------------------------------------------------------------------------------------------------
def non_finite_names(named_values) -> list[str]:
    """Names of the floating torch tensors and numpy arrays of ``(name, value)`` pairs that hold NaN or Inf (other
    values are skipped)."""
    return [name for name, value in named_values if not _finite(value)]


def _finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no isfinite for fp8: widen (exact)
            value = value.to(torch.bfloat16)
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return bool(np.isfinite(value).all())
    return True


def shown_names(names: list[str]) -> str:
    """The first few of ``names``, and how many there are in all."""
    return ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if len(names) > 3 else "")


def check_finite_weights(module: torch.nn.Module | None, where: str) -> None:
    """Raise :class:`NonFiniteError` naming the parameters and buffers of ``module`` that hold NaN or Inf."""
    if module is None:
        return
    bad = non_finite_names([*module.named_parameters(), *module.named_buffers()])
    if bad:
        raise NonFiniteError(f"{where} holds non-finite weights (NaN or Inf) in {shown_names(bad)}")


def check_finite_inputs(**tensors) -> None:
    """Raise :class:`NonFiniteError` naming the arguments (torch tensors, numpy arrays; others are skipped) that
    hold NaN or Inf."""
    bad = non_finite_names(tensors.items())
    if bad:
        raise NonFiniteError(f"{shown_names(bad)} hold{'s' if len(bad) == 1 else ''} non-finite values (NaN or Inf)")


def check_first_block(latents: torch.Tensor, transformer: torch.nn.Module, **inputs) -> None:
    """After the first generated block: when its clean latents [B, C, f, H, W] hold NaN or Inf, raise
    :class:`NonFiniteError` saying where they came from: the request's ``inputs`` (e.g. the prompt embeddings and
    the noise), the transformer's weights, or else the transformer's computation (an overflow of its dtype)."""
    if bool(torch.isfinite(latents).all()):
        return
    bad = non_finite_names(inputs.items())
    if bad:
        cause = f"the non-finite values come from {shown_names(bad)}"
    else:
        weights = non_finite_names(transformer.named_parameters())
        cause = (f"the transformer's weights hold non-finite values ({shown_names(weights)})" if weights else
                 f"its inputs and weights are finite: the transformer's {transformer.dtype} computation overflowed "
                 "(try float32 or bfloat16)")
    raise NonFiniteError(f"the first block's latents hold non-finite values (NaN or Inf): {cause}")


# -- argument types ---------------------------------------------------------------------------------------------------
def check_arguments(request) -> None:
    """A request's arguments (a ``GenerationRequest``) have the types and ranges they must have, before any default
    fills in (0 is never "the default"): ``ValueError`` / ``TypeError`` naming the argument and the value otherwise.
    Its tensors (``prompt_embeds``, ``latents``, ``image``, ...) must be finite where given as tensors or arrays."""
    r = request
    if r.prompt is not None and not (isinstance(r.prompt, str) or (
            isinstance(r.prompt, (list, tuple)) and r.prompt and all(isinstance(p, str) for p in r.prompt))):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {_short(r.prompt)}")
    for name, low in (("num_frames", 1), ("height", 1), ("width", 1), ("frames_per_block", 1),
                      ("max_sequence_length", 1), ("window_frames", 1), ("sink_frames", 0),
                      ("num_videos_per_prompt", 1)):
        value = getattr(r, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"{name} must be an integer >= {low} (or None for the default), got {_short(value)}")
    generators = r.generator if isinstance(r.generator, list) else [r.generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {_short(r.generator)} (for a "
                        "seed, pass torch.Generator().manual_seed(seed))")
    for name in ("prompt_embeds", "latents", "context_latents"):
        value = getattr(r, name)
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_finite_inputs(**{name: getattr(r, name) for name in TENSOR_ARGUMENTS})


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- size and length --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestPlan:
    """What one request will allocate: ``latent_frames`` of the whole video (context included; None = endless),
    ``cache_frames`` the KV cache holds, a latent size of ``latent_height`` x ``latent_width``, ``frames_per_block``;
    ``relative_positions`` when the rotary positions are relative to a rolling cache; ``keeps_video`` when the decoded
    video is returned whole (``__call__``) rather than block by block (``stream``)."""

    batch: int
    latent_frames: int | None
    cache_frames: int
    latent_height: int
    latent_width: int
    frames_per_block: int
    relative_positions: bool
    keeps_video: bool

    @classmethod
    def of(cls, layout, policy, batch: int, latent_size: tuple[int, int], keeps_video: bool) -> "RequestPlan":
        """The plan of a run laid out as ``layout`` (a :class:`.layout.BlockLayout`) with the KV cache ``policy``
        (a :class:`.session.CachePolicy`)."""
        if policy.window_frames is not None:
            cache_frames = policy.sink_frames + policy.window_frames
        else:
            cache_frames = layout.cache_frames(policy.commit_last_block)
        return cls(batch, layout.total_frames, cache_frames, *latent_size, layout.frames_per_block,
                   policy.relative_positions, keeps_video)


def estimate_memory(pipe, plan: RequestPlan) -> dict[str, int]:
    """Bytes the request needs on its device, by item: ``kv_cache``, ``latents`` (the noise and the clean latents of a
    finite video), ``activations`` (one block through the transformer), ``decode`` (one block through the VAE) and
    ``video`` (the decoded frames kept for ``__call__``). An estimate to refuse hopeless requests early, not a
    measurement."""
    config = pipe.transformer.config
    model_bytes = pipe.transformer.dtype.itemsize
    tokens = pipe.transformer.tokens_per_frame(plan.latent_height, plan.latent_width)
    width = config.num_attention_heads * config.attention_head_dim
    estimate = {
        "kv_cache": 2 * config.num_layers * plan.batch * plan.cache_frames * tokens * width * model_bytes,
        "latents": 0,
        "activations": 4 * plan.batch * plan.frames_per_block * tokens * max(config.ffn_dim, 3 * width) * model_bytes,
        "decode": 0,
        "video": 0,
    }
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    pixels = plan.latent_height * plan.latent_width * spatial**2
    if plan.latent_frames is not None:
        latent = plan.batch * config.in_channels * plan.latent_frames * plan.latent_height * plan.latent_width
        estimate["latents"] = 2 * latent * 4  # float32 noise and clean latents
        if plan.keeps_video:  # decoded blocks, their concatenation and the float32 output
            estimate["video"] = 3 * plan.batch * 3 * (1 + temporal * (plan.latent_frames - 1)) * pixels * 4
    vae = getattr(pipe, "vae", None)
    if vae is not None:  # the full-resolution stage dominates: its channels over one block's frames, in and out
        channels = (getattr(vae.config, "decoder_base_dim", None) or vae.config.base_dim) * vae.config.dim_mult[0]
        estimate["decode"] = 3 * plan.batch * temporal * plan.frames_per_block * pixels * channels * vae.dtype.itemsize
    return estimate


def free_memory(device: torch.device) -> int | None:
    """Bytes a request can still allocate on ``device``: free CUDA memory plus what PyTorch holds unused, or the
    system's available memory for the CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_request(pipe, plan: RequestPlan, device: torch.device) -> None:
    """Refuse at once a request the transformer's rotary table cannot place, or whose estimated memory
    (:func:`estimate_memory`) exceeds what ``device`` has free, with the numbers and what to change."""
    config = pipe.transformer.config
    table = config.rope_max_seq_len
    _, patch_h, patch_w = config.patch_size
    grid = (plan.latent_height // patch_h, plan.latent_width // patch_w)
    if max(grid) > table:
        raise ValueError(f"a {grid[0]}x{grid[1]} token grid per frame exceeds the transformer's {table}-position "
                         "rotary table: use a smaller height or width")
    if plan.latent_frames is not None and not plan.relative_positions and plan.latent_frames > table:
        raise ValueError(
            f"{plan.latent_frames} latent frames exceed the transformer's {table}-position rotary table (video frames "
            f"up to {1 + pipe.vae_scale_factor_temporal * (table - 1)}): use a rolling KV cache (window_frames, CLI "
            "--window-frames), which places frames relative to the cache"
        )
    free = free_memory(device)
    if free is None:
        return
    estimate = estimate_memory(pipe, plan)
    needed = sum(estimate.values())
    if needed <= free:
        return
    parts = ", ".join(f"{name.replace('_', ' ')} {size / GIB:.2f}" for name, size in estimate.items() if size)
    hint = ""
    if estimate["kv_cache"] >= max(estimate.values()) and plan.latent_frames is not None:
        hint = " A rolling KV cache (window_frames, CLI --window-frames) keeps the cache at a fixed size."
    elif estimate["latents"] + estimate["video"] >= max(estimate.values()):
        hint = " stream() (the CLI) keeps no decoded video; num_frames=None streams without end."
    raise MemoryError(
        f"this request needs about {needed / GIB:.2f} GiB on {device} ({parts} GiB) but {free / GIB:.2f} GiB are "
        f"free: use fewer frames or a smaller size.{hint}"
    )


# -- one request at a time --------------------------------------------------------------------------------------------
_LOCKS_GUARD = threading.Lock()
_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()


def _locks_of(pipe) -> list[threading.Lock]:
    """One lock per model the pipeline runs (the transformer and the VAE hold per-request state: the KV cache's
    CUDA graphs, the VAE fast path's swapped forwards), so pipelines that share a model share its lock."""
    models = [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "vae", None)) if m is not None]
    with _LOCKS_GUARD:
        return [_LOCKS.setdefault(model, threading.Lock()) for model in models]


def exclusive_use(pipe, blocks: Iterator) -> Iterator:
    """Iterate ``blocks`` (a request's generator) while holding the pipeline's models for it; a second request
    meanwhile (another thread, a ``stream()`` not yet finished or closed, another pipeline sharing a model) raises
    :class:`ConcurrentUseError` instead of silently sharing their state (KV cache, latents, decoders)."""
    held = []
    for lock in _locks_of(pipe):
        if not lock.acquire(blocking=False):
            for other in held:
                other.release()
            blocks.close()
            raise ConcurrentUseError(
                f"this {type(pipe).__name__} (or a pipeline sharing its transformer or VAE) is already generating a "
                "video, in another thread or in a stream() not yet finished or closed. A pipeline runs one request "
                "at a time: wait for it, close the stream, or give each thread its own pipeline with its own models."
            )
        held.append(lock)
    try:
        yield from blocks
    finally:
        blocks.close()
        for lock in held:
            lock.release()
