"""Fused kernels for the hot elementwise work, each beside the plain PyTorch reference that defines it.

``qk_norm_rope`` (and ``qk_norm_rope_pair``, queries and keys at once), ``adaln_modulate`` and ``gated_residual`` are
what the transformer calls; ``channel_rms_norm`` is the Wan VAE decoder's norm (+ SiLU) on its fast path. On CUDA
tensors they run one of three backends:

- ``triton``: the hand-written kernels of :mod:`.triton_kernels` (needs the ``triton`` package);
- ``compile``: the references compiled by ``torch.compile``;
- ``reference``: the plain PyTorch functions of :mod:`.reference` (always what CPU tensors get).

Pick one with the environment variable ``ONEFORCING_KERNELS`` (``auto``, ``triton``, ``compile``, ``reference``;
``0`` means ``reference``) or :func:`set_kernel_backend`. ``auto`` (the default) resolves at the first CUDA call:
triton if it imports and passes a self-check against the references, else compile, else reference, with one logged
warning that says why. A backend that fails at run time is dropped the same way. Never required.

Calls that need gradients, and calls traced by ``torch.compile``, never use the Triton kernels (they have no
backward and are opaque to the compiler): they get ``compile`` and ``reference`` respectively.
"""

from __future__ import annotations

import logging
import os

import torch

from . import reference

__all__ = [
    "BACKENDS",
    "active_kernels",
    "adaln_modulate",
    "channel_rms_norm",
    "fused_kernels_enabled",
    "gated_residual",
    "qk_norm_rope",
    "qk_norm_rope_pair",
    "set_fused_kernels",
    "set_kernel_backend",
]

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "compile", "reference")
_CHOICES = ("auto",) + BACKENDS
_ENV = "ONEFORCING_KERNELS"
_FALLBACKS = {"auto": BACKENDS, "triton": BACKENDS, "compile": ("compile", "reference"), "reference": ("reference",)}


def _parse(value: str) -> str:
    value = value.strip().lower()
    if value in ("", "1", "on", "true"):
        return "auto"
    if value in ("0", "off", "false"):
        return "reference"
    if value not in _CHOICES:
        raise ValueError(f"kernel backend must be one of {', '.join(_CHOICES)} (or 0 for reference), got {value!r}")
    return value


try:
    _env_choice = _parse(os.environ.get(_ENV, "auto"))
except ValueError as _err:  # a typo in the environment must not stop the package from importing
    logger.warning("ignoring %s: %s; using auto", _ENV, _err)
    _env_choice = "auto"

_requested = _env_choice
_problems: dict[str, str] = {}  # backend -> why it cannot be used (self-check or run-time failure)
_resolved: dict[str, str] = {}  # requested choice -> backend in use for CUDA tensors
_warned: set[str] = set()
_triton = None  # the .triton_kernels module once imported
_compiled: dict[str, object] = {}
_DYNAMIC = {"channel_rms_norm"}  # kernels called with many shapes: compiled once for all of them


# -- selection --------------------------------------------------------------------------------------------------------
def set_kernel_backend(backend: str) -> None:
    """Use ``backend`` ("auto", "triton", "compile" or "reference") for CUDA tensors from now on."""
    global _requested
    _requested = _parse(str(backend))


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused CUDA versions on (the ``ONEFORCING_KERNELS`` choice, or auto) or off (reference)."""
    global _requested
    _requested = (_env_choice if _env_choice != "reference" else "auto") if enabled else "reference"


def fused_kernels_enabled() -> bool:
    """False when CUDA tensors get the references (chosen, or every fused backend failed)."""
    return _requested != "reference" and _resolved.get(_requested) != "reference"


def active_kernels(device: torch.device | str | None = None) -> str:
    """The backend CUDA tensors on ``device`` (default: the current GPU) get: "triton", "compile" or "reference".

    Resolves the choice now (running the Triton self-check if it has not run yet); "reference" without CUDA.
    """
    if _requested == "reference":
        return "reference"
    if device is None:
        if not torch.cuda.is_available():
            return "reference"
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    return _backend(device) if device.type == "cuda" else "reference"


def _backend(device: torch.device) -> str:
    backend = _resolved.get(_requested)
    if backend is None:
        skipped = []
        for backend in _FALLBACKS[_requested]:
            problem = _problem(backend, device)
            if problem is None:
                break
            skipped.append(f"{backend}: {problem}")
        _resolved[_requested] = backend
        if skipped:
            _warn_once(f"oneforcing kernels: using {backend} ({'; '.join(skipped)})")
    return backend


def _problem(backend: str, device: torch.device) -> str | None:
    if backend not in _problems:
        if backend == "triton":
            problem = _triton_problem(device)
        elif backend == "compile":
            problem = None if _triton_importable() else "torch.compile needs triton for CUDA"
        else:
            problem = None
        if problem is None:
            return None
        _problems[backend] = problem
    return _problems[backend]


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_problem(device: torch.device) -> str | None:
    global _triton
    if _triton is not None:
        return None
    try:
        from . import triton_kernels
    except ImportError as err:
        return f"not importable ({err})"
    from .self_check import mismatches

    try:
        with torch.cuda.device(device):
            bad = mismatches(triton_kernels, device)
    except Exception as err:  # no working compiler toolchain, an unsupported GPU, ...
        return f"self-check failed ({type(err).__name__}: {err})"
    if bad:
        return f"self-check mismatch ({'; '.join(bad)})"
    _triton = triton_kernels
    return None


def _drop(backend: str, err: Exception) -> None:
    """A backend failed at run time: never use it again in this process."""
    _problems[backend] = f"{type(err).__name__}: {err}"
    _resolved.clear()
    _warn_once(f"oneforcing kernels: {backend} failed ({_problems[backend]}); falling back")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# -- dispatch ---------------------------------------------------------------------------------------------------------
def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _dispatch(name: str, x: torch.Tensor, *args):
    if x.is_cuda and _requested != "reference" and not torch.compiler.is_compiling():
        backend = _resolved.get(_requested)
        if backend is None and not torch.cuda.is_current_stream_capturing():  # the self-check cannot run in a capture
            backend = _backend(x.device)
        if backend == "triton" and not _needs_grad((x,) + args):
            try:
                return getattr(_triton, name)(x, *args)
            except ValueError:
                pass  # inputs the kernels do not take (the references may): this call goes on below
            except Exception as err:
                _drop("triton", err)
                backend = _backend(x.device)
        if backend in ("triton", "compile") and "compile" not in _problems:
            fn = _compiled.get(name)
            if fn is None:
                fn = _compiled[name] = torch.compile(getattr(reference, name), dynamic=name in _DYNAMIC)
            try:
                return fn(x, *args)
            except Exception as err:
                _drop("compile", err)
    return getattr(reference, name)(x, *args)


def qk_norm_rope(x, weight, cos, sin, num_heads: int, eps: float):
    """See :func:`.reference.qk_norm_rope`."""
    return _dispatch("qk_norm_rope", x, weight, cos, sin, num_heads, eps)


def qk_norm_rope_pair(q, k, weight_q, weight_k, cos, sin, num_heads: int, eps: float):
    """See :func:`.reference.qk_norm_rope_pair`; the Triton backend normalises and rotates both in one launch."""
    return _dispatch("qk_norm_rope_pair", q, k, weight_q, weight_k, cos, sin, num_heads, eps)


def adaln_modulate(x, shift, scale, eps: float):
    """See :func:`.reference.adaln_modulate`."""
    return _dispatch("adaln_modulate", x, shift, scale, eps)


def gated_residual(x, y, gate):
    """See :func:`.reference.gated_residual`."""
    return _dispatch("gated_residual", x, y, gate)


def channel_rms_norm(x, gamma, bias, scale: float, silu: bool):
    """See :func:`.reference.channel_rms_norm`; the Triton backend takes channels-last tensors (others fall back)."""
    return _dispatch("channel_rms_norm", x, gamma, bias, scale, silu)
