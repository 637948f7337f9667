"""A faster way to run diffusers' Wan VAE decoder and encoder, computing the same function (within rounding).

Measured on an H200 (``benchmarks/vae_benchmark.py``, 81 frames at 480x832, bf16), most of diffusers' decode time is
not convolution arithmetic: its 3-D convolutions run on NCDHW tensors that cuDNN transposes to NDHWC and back around
every call, and its RMS norm takes about six float32 passes over each activation. Three changes, each optional:

- ``conv``: every causal 3-D convolution with stride 1 (kernel (kt, kh, kw)) becomes 2-D convolutions over frames in
  channels-last layout. Output frame t depends on input frames t-kt+1 .. t (earlier ones from the cache of the
  previous call, or zeros), so it is either one 2-D convolution per temporal tap, summed (``"taps"``), or one 2-D
  convolution over the kt frames stacked along channels (``"stacked"``: one larger GEMM, a kt-times temporary).
  Activations then stay in channels-last 3-D memory order ([B, T, H, W, C] in memory, logical [B, C, T, H, W]).
- ``fuse_norm``: each RMS norm runs as one fused kernel (:func:`oneforcing.kernels.channel_rms_norm`), with the SiLU
  that follows it in the residual blocks and the output head folded in (that SiLU module then passes its input on).
- ``bf16_upsample``: the nearest-neighbour upsampling runs in the activation dtype instead of a float32 round trip
  (nearest only copies values: the result is the same bits), on a channels-last copy of its input: diffusers'
  temporal upsampling stacks frames into a channels-first tensor, and converting it here, at the lower resolution,
  keeps everything after it channels-last (the upsamplers' 2-D convolutions run with channels-last weights, so that
  their output is channels-last on every backend; the attention block's output is made channels-last).

:class:`WanFastPath` installs these on a module tree (a VAE's ``decoder`` or ``encoder``) for the duration of a
``with`` block, as instance attributes that shadow the modules' ``forward``, and removes them afterwards: the VAE
object is left exactly as it was. Convolutions it cannot take (the encoder's strided temporal downsampling) keep
diffusers' own code and only hand on channels-last output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanDecoder3d,
    WanEncoder3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
)

from .. import kernels

CONV_MODES = ("taps", "stacked")


# -- causal 3-D convolutions as 2-D ones -----------------------------------------------------------------------------
def _eligible(conv: WanCausalConv3d) -> bool:
    return (
        conv.stride == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        # causal in time (front padding kt-1), symmetric "same" padding in space
        and conv._padding[4] == conv.kernel_size[0] - 1
        and conv._padding[0] == conv._padding[1] == (conv.kernel_size[2] - 1) // 2
        and conv._padding[2] == conv._padding[3] == (conv.kernel_size[1] - 1) // 2
    )


class _WeightCache:
    """The reshaped 2-D weights of one convolution, rebuilt when its parameter changes (in place or replaced)."""

    def __init__(self):
        self._key = None
        self._weights = None

    def get(self, conv: torch.nn.Module, mode: str, dtype: torch.dtype) -> list[torch.Tensor]:
        """``mode``: "taps" or "stacked" for a causal 3-D convolution, "2d" for a plain 2-D one."""
        w = conv.weight
        # inference tensors (weights loaded under torch.inference_mode, as ComfyUI does) keep no version counter;
        # a new parameter still shows as a new data pointer
        version = None if w.is_inference() else w._version
        key = (mode, w.data_ptr(), version, w.device, dtype)
        if key != self._key:
            w = w.detach().to(dtype)
            if mode == "2d":
                weights = [w]
            elif mode == "stacked":  # input channel block i of the stack is temporal tap i
                o, c, kt, kh, kw = w.shape
                weights = [w.permute(0, 2, 1, 3, 4).reshape(o, kt * c, kh, kw)]
            else:
                weights = [w[:, :, i] for i in range(w.shape[2])]
            self._weights = [m.contiguous(memory_format=torch.channels_last) for m in weights]
            self._key = key
        return self._weights


def frame_conv(conv: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None, mode: str = "taps",
               weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``conv(x, cache_x)`` computed with 2-D convolutions.

    Args:
        conv: an eligible ``WanCausalConv3d`` (stride 1, zero "same" padding in space, causal in time).
        x: [B, C, T, H, W].
        cache_x: the previous call's last input frames [B, C, Tc, H, W] or None (then zeros stand in for them).
        mode: ``"taps"`` or ``"stacked"`` (see the module docstring).
        weights: the reshaped weights from a weight cache (built here when None).

    Returns:
        [B, O, T, H, W] in channels-last 3-D memory order, the dtype of ``x``.
    """
    if mode not in CONV_MODES:
        raise ValueError(f"mode must be one of {CONV_MODES}, got {mode!r}")
    kt, kh, kw = conv.kernel_size
    b, c, t, h, w = x.shape
    if weights is None:
        weights = _WeightCache().get(conv, mode, x.dtype)
    # [B, T + kt - 1, H, W, C] contiguous: zeros for missing history, the cached frames, then x
    front = kt - 1
    parts = []
    if cache_x is not None and front > 0:
        cache_x = cache_x[:, :, -front:].to(device=x.device, dtype=x.dtype)
        front -= cache_x.shape[2]
    else:
        cache_x = None
    if front > 0:
        parts.append(x.new_zeros(b, 1, h, w, c).expand(b, front, h, w, c))
    if cache_x is not None:
        parts.append(cache_x.permute(0, 2, 3, 4, 1))
    parts.append(x.permute(0, 2, 3, 4, 1))
    frames = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()
    padding = ((kh - 1) // 2, (kw - 1) // 2)
    bias = None if conv.bias is None else conv.bias.to(x.dtype)

    def as_images(view: torch.Tensor) -> torch.Tensor:  # [B, t, H, W, K] -> [B*t, K, H, W] channels-last
        return view.reshape(b * t, h, w, view.shape[-1]).permute(0, 3, 1, 2)

    if mode == "stacked":
        stack = torch.cat([frames[:, i : i + t] for i in range(kt)], dim=-1) if kt > 1 else frames
        out = F.conv2d(as_images(stack), weights[0], bias, padding=padding)
    else:
        out = F.conv2d(as_images(frames[:, 0:t]), weights[0], bias, padding=padding)
        for i in range(1, kt):
            out.add_(F.conv2d(as_images(frames[:, i : i + t]), weights[i], None, padding=padding))
    # [B*T, O, H, W] channels-last -> [B, O, T, H, W] with memory order [B, T, H, W, O]
    return out.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)


# -- RMS norm (+ SiLU) and upsampling --------------------------------------------------------------------------------
def _norm_forward(norm: WanRMS_norm, silu: bool):
    def forward(x):
        bias = norm.bias if isinstance(norm.bias, torch.Tensor) else None
        return kernels.channel_rms_norm(x, norm.gamma, bias, norm.scale, silu)

    return forward


def _norms_followed_by_silu(module: torch.nn.Module) -> list[tuple[torch.nn.Module, list[WanRMS_norm]]]:
    """(the SiLU module, the norms it always follows) in diffusers' residual blocks and the decoder's and encoder's
    output heads."""
    pairs = []
    for m in module.modules():
        silu = getattr(m, "nonlinearity", None)
        if not isinstance(silu, torch.nn.SiLU):
            continue
        if isinstance(m, WanResidualBlock):
            pairs.append((silu, [m.norm1, m.norm2]))
        elif isinstance(m, (WanDecoder3d, WanEncoder3d)):
            pairs.append((silu, [m.norm_out]))
    # a SiLU module shared with any other module could be applied to something that no fused norm produced
    owners: dict[int, int] = {}
    for m in module.modules():
        for child in m.children():
            owners[id(child)] = owners.get(id(child), 0) + 1
    return [(silu, norms) for silu, norms in pairs if owners.get(id(silu)) == 1
            and all(isinstance(n, WanRMS_norm) and n.channel_first for n in norms)]


def _upsample_forward(upsample: WanUpsample):
    def forward(x):
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.nn.Upsample.forward(upsample, x)

    return forward


def _channels_last_conv2d(conv: torch.nn.Conv2d):
    """A 2-D convolution whose input and weight are channels-last, so its output is too (on every backend)."""
    cache = _WeightCache()

    def forward(x):
        weight = cache.get(conv, "2d", x.dtype)[0]
        bias = None if conv.bias is None else conv.bias.to(x.dtype)
        return conv._conv_forward(x.contiguous(memory_format=torch.channels_last), weight, bias)

    return forward


def _channels_last_output(block: torch.nn.Module):
    """``block``'s own forward, its 5-D output made channels-last."""

    def forward(x, *args):
        return type(block).forward(block, x, *args).contiguous(memory_format=torch.channels_last_3d)

    return forward


def _identity(x):
    return x


class WanFastPath:
    """``with WanFastPath(vae.decoder):`` — the decoder (or encoder) below runs the fast path of this module.

    Weight reshapes are cached in this object across ``with`` blocks (and rebuilt if a weight changes).

    Args:
        module: the root of the module tree (a VAE's ``decoder`` or ``encoder``).
        conv: ``"taps"`` (default), ``"stacked"`` or None (keep diffusers' 3-D convolutions).
        fuse_norm: fused RMS norm (+ the SiLU after it) kernels.
        bf16_upsample: nearest upsampling in the activation dtype.
    """

    def __init__(self, module: torch.nn.Module, conv: str | None = "taps", fuse_norm: bool = True,
                 bf16_upsample: bool = True):
        if conv is not None and conv not in CONV_MODES:
            raise ValueError(f"conv must be one of {CONV_MODES} or None, got {conv!r}")
        self.conv = conv
        self._forwards: dict[torch.nn.Module, object] = {}
        if conv is not None:
            for m in module.modules():
                if isinstance(m, WanCausalConv3d):
                    # the others (the encoder's strided temporal downsampling) keep diffusers' 3-D convolution and
                    # only hand on a channels-last output
                    self._forwards[m] = self._conv_forward(m) if _eligible(m) else _channels_last_output(m)
        if fuse_norm:
            fused = set()
            for silu, norms in _norms_followed_by_silu(module):
                self._forwards[silu] = _identity
                for norm in norms:
                    self._forwards[norm] = _norm_forward(norm, silu=True)
                    fused.add(norm)
            for m in module.modules():
                if isinstance(m, WanRMS_norm) and m.channel_first and m not in fused:
                    self._forwards[m] = _norm_forward(m, silu=False)
        if bf16_upsample:
            for m in module.modules():
                if isinstance(m, WanUpsample) and m.mode in ("nearest", "nearest-exact"):
                    self._forwards[m] = _upsample_forward(m)
        if conv is not None or fuse_norm:
            # keep activations channels-last where diffusers' reshapes lose it: the attention block's output (its
            # residual sum with a single frame comes out channels-first) and the upsamplers' 2-D convolutions
            for m in module.modules():
                if isinstance(m, WanAttentionBlock):
                    self._forwards[m] = _channels_last_output(m)
                if isinstance(m, WanResample):
                    for layer in m.resample.modules():
                        if type(layer) is torch.nn.Conv2d and layer.padding_mode == "zeros":
                            self._forwards[layer] = _channels_last_conv2d(layer)
        self._active = False

    def _conv_forward(self, conv: WanCausalConv3d):
        cache = _WeightCache()

        def forward(x, cache_x=None):
            return frame_conv(conv, x, cache_x, self.conv, cache.get(conv, self.conv, x.dtype))

        return forward

    @staticmethod
    def applicable(module: torch.nn.Module) -> bool:
        """False when a module of the tree already has its forward replaced on the instance (accelerate's offload
        hooks do this): the fast path would shadow that and must not be used."""
        return not any("forward" in m.__dict__ or hasattr(m, "_hf_hook") for m in module.modules())

    def __enter__(self) -> "WanFastPath":
        if self._active:
            raise RuntimeError("WanFastPath is already active")
        taken = [type(m).__name__ for m in self._forwards if "forward" in m.__dict__]
        if taken:
            raise RuntimeError(f"WanFastPath: {', '.join(sorted(set(taken)))} already have an instance forward "
                               "(an offload hook?); check WanFastPath.applicable first")
        for m, forward in self._forwards.items():
            m.forward = forward  # an instance attribute shadows the class's forward
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        for m in self._forwards:
            m.__dict__.pop("forward", None)
        self._active = False
