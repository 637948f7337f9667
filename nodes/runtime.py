"""ComfyUI's runtime services (model management, progress, interruption, previews), with plain fallbacks.

The nodes call only these functions. Inside a running ComfyUI (its modules are already imported) they use ComfyUI's
own machinery; elsewhere (tests, scripts) they fall back to plain PyTorch behaviour. This module never imports ComfyUI
itself: importing ``comfy.*`` outside the server has side effects (device probing at import time).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

import torch


def _comfy(name: str):
    """A ComfyUI module if ComfyUI is running in this process, else None."""
    return sys.modules.get(name)


def in_comfyui() -> bool:
    return _comfy("comfy.model_management") is not None


class ModelHolder(torch.nn.Module):
    """A plain module holding this package's models, so that ComfyUI's ``ModelPatcher`` can move them.

    diffusers models expose ``device`` as a read-only property, which ``ModelPatcher`` assigns; this holder has a
    plain ``device`` attribute and registers the real models as children (``holder.transformer`` ...).
    """

    def __init__(self, **modules: torch.nn.Module):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        first = next(iter(modules.values()))
        param = next(first.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    def get_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class PlainPatcher:
    """Outside ComfyUI: the same ``.model`` / ``.load_device`` surface as a ``ModelPatcher``, without offloading."""

    def __init__(self, model: ModelHolder, load_device: torch.device):
        self.model = model
        self.load_device = load_device
        self.offload_device = torch.device("cpu")


_DEVICE_FUNCTIONS = {
    # kind -> (load device, offload device) functions of comfy.model_management
    "diffusion_model": ("get_torch_device", "unet_offload_device"),
    "text_encoder": ("text_encoder_device", "text_encoder_offload_device"),
    "vae": ("vae_device", "vae_offload_device"),
}


def default_device() -> torch.device:
    """Where models run: ComfyUI's choice inside ComfyUI, else CUDA when available, else the CPU."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def manage(holder: ModelHolder, kind: str):
    """Hand ``holder`` to ComfyUI's model management (a ``ModelPatcher``), or wrap it plainly outside ComfyUI."""
    if kind not in _DEVICE_FUNCTIONS:
        raise ValueError(f"unknown model kind {kind!r}")
    mm = _comfy("comfy.model_management")
    patcher_module = _comfy("comfy.model_patcher")
    if mm is None or patcher_module is None:
        return PlainPatcher(holder, default_device())
    load_name, offload_name = _DEVICE_FUNCTIONS[kind]
    load_device, offload_device = getattr(mm, load_name)(), getattr(mm, offload_name)()
    holder.to(offload_device)
    holder.device = offload_device
    return patcher_module.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)


def load(patcher) -> torch.device:
    """Put the patcher's models on their load device (ComfyUI frees room by offloading others); returns it."""
    mm = _comfy("comfy.model_management")
    if mm is not None and not isinstance(patcher, PlainPatcher):
        # full load: these modules have no ComfyUI weight-casting ops, so a partial load would split devices
        mm.load_models_gpu([patcher], force_full_load=True)
    else:
        patcher.model.to(patcher.load_device)
        patcher.model.device = patcher.load_device
    return torch.device(patcher.load_device)


def intermediate_device() -> torch.device:
    """Where node outputs (LATENT, IMAGE, CONDITIONING) live between nodes: the CPU unless ComfyUI says otherwise."""
    mm = _comfy("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def free_cache() -> None:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def idle_cpus(window_s: float = 0.05) -> int:
    """CPUs of this process's affinity that other processes leave idle, from ``/proc/stat`` over ``window_s`` (at
    least 1); without ``/proc/stat``, every CPU of the affinity."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def sample():
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait (jiffies over all CPUs)

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return usable
    if total1 <= total0:
        return usable
    machine = os.cpu_count() or usable
    idle = round(machine * (idle1 - idle0) / (total1 - total0))
    return max(1, min(usable, idle))


@contextlib.contextmanager
def cpu_threads(device: torch.device) -> Iterator[int]:
    """On the CPU, run the block with as many torch threads as there are idle CPUs, then restore the setting.

    torch's default (one thread per core) makes every operator wait at a barrier for all its threads; when another
    busy process holds a core, the thread on it runs late each time and the whole rollout slows many times over
    (benchmarks/cpu_contention.py measures it). Fewer threads than cores only lose the busy cores' share. GPU work
    is left alone. Yields the thread count used.
    """
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        yield before
        return
    threads = min(before, idle_cpus())
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def check_interrupted(extra: Callable[[], bool] | None = None) -> None:
    """Raise if the user cancelled: ComfyUI's interrupt (``POST /interrupt``), or ``extra()`` returning True."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    if extra is not None and extra():
        raise InterruptedError("generation cancelled")


class Progress:
    """A per-block progress bar: ComfyUI's ``ProgressBar`` (with an optional preview image) or a no-op.

    ``on_update(value, total)`` is an extra observer (tests use it).
    """

    def __init__(self, total: int, on_update: Callable[[int, int], None] | None = None):
        utils = _comfy("comfy.utils")
        self.bar = utils.ProgressBar(total) if utils is not None else None
        self.total = total
        self.on_update = on_update

    def update(self, value: int, preview=None) -> None:
        if self.bar is not None:
            self.bar.update_absolute(value, self.total, preview)
        if self.on_update is not None:
            self.on_update(value, self.total)


def latent_previewer(device: torch.device):
    """ComfyUI's previewer for Wan2.1 latents, honouring the user's ``--preview-method``; None outside ComfyUI.

    It takes *normalised* latents (what ComfyUI's own samplers hand it) and returns a preview for ``Progress``.
    """
    preview = _comfy("latent_preview")
    formats = _comfy("comfy.latent_formats")
    if preview is None or formats is None:
        return None
    previewer = preview.get_previewer(device, formats.Wan21())
    if previewer is None:
        return None

    def make(latents: torch.Tensor):
        # [B, C, f, h, w] -> the block's last frame of the first video
        return previewer.decode_latent_to_preview_image("JPEG", latents[:1, :, -1:].float())

    return make
