"""A faster way to run diffusers' Wan VAE decoder and encoder, computing the same function (within rounding).

Measured on an H200 (``benchmarks/vae_benchmark.py``, 81 frames at 480x832, bf16), most of diffusers' decode time is
not convolution arithmetic: its 3-D convolutions run on NCDHW tensors that cuDNN transposes to NDHWC and back around
every call, and its RMS norm takes about six float32 passes over each activation. Three changes, each optional:

- ``conv``: every causal 3-D convolution with stride 1 (kernel (kt, kh, kw)) becomes 2-D convolutions over frames in
  channels-last layout. Output frame t depends on input frames t-kt+1 .. t (earlier ones from the cache of the
  previous call, or zeros), so it is either one 2-D convolution per temporal tap, each over the frames that tap reads
  (from the input or the cache, never copied together) and added into the output (``"taps"``), or one 2-D
  convolution over the kt frames stacked along channels (``"stacked"``: one larger GEMM, a kt-times temporary).
  Activations then stay in channels-last 3-D memory order ([B, T, H, W, C] in memory, logical [B, C, T, H, W]).
- ``fuse_norm``: each RMS norm runs as one fused kernel (:func:`oneforcing.kernels.ops.channel_rms_norm`), with the SiLU
  that follows it in the residual blocks and the output head folded in (that SiLU module then passes its input on).
- ``subpixel_upsample``: an upsampler's 2x nearest upsampling and the 3x3 convolution after it become four 2x2
  convolutions on the low-resolution input, one per output pixel phase (4/9 of the arithmetic, no upsampled copy).
- ``chunk_frames``: the decoder's stages after its last temporal upsampling run on a few frames at a time (their
  causal caches carry over between pieces exactly as between calls), so only those frames' full-resolution
  activations are alive at once (Wan2.1 VAE alone at 480x832 on an H200: 0.2 GiB less peak memory with two frames of
  four, 0.6 GiB with one, which however runs 1.8x slower).
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
    WanUpBlock,
    WanUpsample,
)

from ..kernels import ops

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
        self.weights: list[torch.Tensor] = []

    def get(self, conv: torch.nn.Module, mode: str, dtype: torch.dtype) -> list[torch.Tensor]:
        """``mode``: "taps" or "stacked" for a causal 3-D convolution, "2d" for a plain 2-D one, "subpixel" for a
        3x3 one after 2x nearest upsampling."""
        w = conv.weight
        # inference tensors (weights loaded under torch.inference_mode, as ComfyUI does) keep no version counter;
        # a new parameter still shows as a new data pointer
        version = None if w.is_inference() else w._version
        key = (mode, w.data_ptr(), version, w.device, dtype)
        if key != self._key:
            w = w.detach().to(dtype)
            if mode == "2d":
                weights = [w]
            elif mode == "subpixel":
                weights = [subpixel_weights(conv.weight.detach()).to(dtype)]
            elif mode == "stacked":  # input channel block i of the stack is temporal tap i
                o, c, kt, kh, kw = w.shape
                weights = [w.permute(0, 2, 1, 3, 4).reshape(o, kt * c, kh, kw)]
            else:
                weights = [w[:, :, i] for i in range(w.shape[2])]
            self.weights = [m.contiguous(memory_format=torch.channels_last) for m in weights]
            self._key = key
        return self.weights


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
    padding = ((kh - 1) // 2, (kw - 1) // 2)
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    # the kt - 1 input frames before x, [B, hc, H, W, C]: the cached ones (hc of them; zeros stand for the rest)
    history = None
    if cache_x is not None and kt > 1:
        history = cache_x[:, :, -(kt - 1):].to(device=x.device, dtype=x.dtype).permute(0, 2, 3, 4, 1).contiguous()
    x = x.permute(0, 2, 3, 4, 1).contiguous()  # [B, T, H, W, C]: a view when x is channels-last 3-D already

    def images(view: torch.Tensor) -> torch.Tensor:  # [B, t, H, W, K] -> [B*t, K, H, W] channels-last
        return view.reshape(-1, h, w, view.shape[-1]).permute(0, 3, 1, 2)

    def frames_of(out: torch.Tensor) -> torch.Tensor:  # [B*t, O, H, W] channels-last -> [B, t, H, W, O] (a view)
        return out.permute(0, 2, 3, 1).unflatten(0, (b, -1))

    if mode == "stacked":
        parts = [x] if history is None else [history, x]
        missing = kt - 1 - (0 if history is None else history.shape[1])
        if missing > 0:
            parts.insert(0, x.new_zeros(b, 1, h, w, c).expand(b, missing, h, w, c))
        padded = torch.cat(parts, dim=1) if len(parts) > 1 else x
        stack = torch.cat([padded[:, i : i + t] for i in range(kt)], dim=-1) if kt > 1 else padded
        out = F.conv2d(images(stack), weights[0], bias, padding=padding)
    else:
        # one 2-D convolution per temporal tap over the frames it reads, added into the output frames they make:
        # tap i reads input frame j - s for output frame j (s = kt - 1 - i frames back), from x or from the history
        out = F.conv2d(images(x), weights[kt - 1], bias, padding=padding)
        acc = frames_of(out)
        cached = 0 if history is None else history.shape[1]
        for i in range(kt - 1):
            s = kt - 1 - i
            if t > s:
                acc[:, s:].add_(frames_of(F.conv2d(images(x[:, : t - s]), weights[i], None, padding=padding)))
            first = max(0, s - cached)  # output frames before it read zeros (missing history)
            last = min(s, t)
            if first < last:
                src = history[:, cached - s + first : cached - s + last]
                acc[:, first:last].add_(frames_of(F.conv2d(images(src), weights[i], None, padding=padding)))
    # [B*T, O, H, W] channels-last -> [B, O, T, H, W] with memory order [B, T, H, W, O]
    return out.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)


# -- RMS norm (+ SiLU) and upsampling --------------------------------------------------------------------------------
def _norm_forward(norm: WanRMS_norm, silu: bool):
    def forward(x):
        bias = norm.bias if isinstance(norm.bias, torch.Tensor) else None
        return ops.channel_rms_norm(x, norm.gamma, bias, norm.scale, silu)

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


# -- nearest 2x upsampling followed by a 3x3 convolution, as four 2x2 convolutions at the low resolution ----------
_PHASE_ROWS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # even output rows read input rows i-1, i
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # odd output rows read input rows i, i+1


def _upsample_conv_eligible(seq: torch.nn.Module) -> bool:
    """A ``Sequential(WanUpsample(2x nearest), Conv2d(3x3, padding 1))``, as diffusers' Wan upsamplers are."""
    if not isinstance(seq, torch.nn.Sequential) or len(seq) != 2:
        return False
    up, conv = seq
    return (
        isinstance(up, WanUpsample) and up.mode in ("nearest", "nearest-exact") and up.size is None
        and tuple(float(f) for f in up.scale_factor) == (2.0, 2.0)
        and type(conv) is torch.nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
    )


def subpixel_weights(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] weights of a 3x3 convolution applied after 2x nearest upsampling -> [4*O, C, 2, 2] weights of
    the four 2x2 convolutions on the low-resolution input that give output phase (row parity a, column parity b)
    in output channel block 2a + b. Summed in float32."""
    rows = _PHASE_ROWS.to(weight.device)
    phases = torch.einsum("akh,bmw,ochw->abockm", rows, rows, weight.float())  # [2, 2, O, C, 2, 2]
    return phases.reshape(-1, *phases.shape[3:])


def upsample_conv(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` (zero padding 1) from the low-resolution input.

    Output pixel (2i + a, 2j + b) sees input rows/columns i-1..i (even) or i..i+1 (odd) only, so one 2x2 convolution
    per phase does it with 4/9 of the arithmetic, and the 4x larger upsampled input is never made.

    Args:
        x: [N, C, H, W]; weights: from :func:`subpixel_weights` ([4*O, C, 2, 2], the dtype of x); bias: [O] or None.
    Returns:
        [N, O, 2H, 2W], channels-last.
    """
    n, _, h, w = x.shape
    o = weights.shape[0] // 4
    if bias is not None:
        bias = bias.repeat(4)
    phases = F.conv2d(x.contiguous(memory_format=torch.channels_last), weights, bias, padding=1)  # [N, 4O, H+1, W+1]
    phases = phases.permute(0, 2, 3, 1)  # channels-last memory: a view
    out = x.new_empty(n, h, 2, w, 2, o)  # memory of [N, 2H, 2W, O]
    for a in (0, 1):
        for b in (0, 1):
            k = 2 * a + b
            out[:, :, a, :, b] = phases[:, a : a + h, b : b + w, k * o : (k + 1) * o]
    return out.view(n, 2 * h, 2 * w, o).permute(0, 3, 1, 2)


def _upsample_conv_forward(seq: torch.nn.Sequential, cache: _WeightCache):
    conv = seq[1]

    def forward(x):
        weights = cache.get(conv, "subpixel", x.dtype)[0]
        return upsample_conv(x, weights, None if conv.bias is None else conv.bias.to(x.dtype))

    return forward


def _channels_last_conv2d(conv: torch.nn.Conv2d, cache: _WeightCache):
    """A 2-D convolution whose input and weight are channels-last, so its output is too (on every backend)."""

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


# -- the decoder's full-resolution stages, a few frames at a time ----------------------------------------------------
def _frame_local_tail(decoder: WanDecoder3d) -> int:
    """Index of the first up block after which no block changes the frame count (no temporal upsampling): from there
    on, every layer is a causal convolution, a norm or a spatial upsampling, so frames can go through in pieces."""
    tail = len(decoder.up_blocks)
    for index in range(len(decoder.up_blocks) - 1, -1, -1):
        block = decoder.up_blocks[index]
        upsamplers = getattr(block, "upsamplers", None)
        if type(block) is not WanUpBlock or (upsamplers is not None and upsamplers[0].mode != "upsample2d"):
            break
        tail = index
    return tail


def _cached_conv(conv: WanCausalConv3d, x: torch.Tensor, feat_cache: list, feat_idx: list) -> torch.Tensor:
    """A causal convolution under diffusers' cache protocol: it sees the slot's cached frames, the slot then keeps
    the last two input frames (the previous slot's last frame joining a single new one)."""
    idx = feat_idx[0]
    keep = x[:, :, -2:].clone()
    if keep.shape[2] < 2 and feat_cache[idx] is not None:
        keep = torch.cat([feat_cache[idx][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, feat_cache[idx])
    feat_cache[idx] = keep
    feat_idx[0] += 1
    return out


def _decoder_forward(decoder: WanDecoder3d, chunk_frames: int):
    """``decoder``'s forward with its frame-local tail (the last up blocks and the output head, at the highest
    resolutions) run ``chunk_frames`` frames at a time: the same result (each causal convolution's cache carries over
    from piece to piece as from call to call), with activations of that many frames instead of the whole call's."""
    tail = _frame_local_tail(decoder)

    def forward(x, feat_cache=None, feat_idx=[0], first_chunk=False):
        if feat_cache is None:
            return type(decoder).forward(decoder, x, feat_cache, feat_idx, first_chunk)
        x = _cached_conv(decoder.conv_in, x, feat_cache, feat_idx)
        x = decoder.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
        for block in decoder.up_blocks[:tail]:
            x = block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
        first_slot, pieces = feat_idx[0], []
        for start in range(0, x.shape[2], chunk_frames):
            feat_idx[0] = first_slot
            y = x[:, :, start : start + chunk_frames]
            for block in decoder.up_blocks[tail:]:
                y = block(y, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
            y = decoder.nonlinearity(decoder.norm_out(y))
            pieces.append(_cached_conv(decoder.conv_out, y, feat_cache, feat_idx))
        return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]

    return forward


class WanFastPath:
    """``with WanFastPath(vae.decoder):`` — the decoder (or encoder) below runs the fast path of this module.

    Weight reshapes are cached in this object across ``with`` blocks (and rebuilt if a weight changes).

    Args:
        module: the root of the module tree (a VAE's ``decoder`` or ``encoder``).
        conv: ``"taps"`` (default), ``"stacked"`` or None (keep diffusers' 3-D convolutions).
        fuse_norm: fused RMS norm (+ the SiLU after it) kernels.
        bf16_upsample: nearest upsampling in the activation dtype.
        subpixel_upsample: each upsampler's 2x nearest upsampling and the 3x3 convolution after it run as 2x2
            convolutions at the low resolution (:func:`upsample_conv`).
        chunk_frames: a decoder's stages after its last temporal upsampling (the full-resolution ones) take this
            many frames at a time, which bounds their activation memory (slower where launches dominate, as on a
            CPU); None: all frames of a call at once.
    """

    def __init__(self, module: torch.nn.Module, conv: str | None = "taps", fuse_norm: bool = True,
                 bf16_upsample: bool = True, subpixel_upsample: bool = True, chunk_frames: int | None = None):
        if conv is not None and conv not in CONV_MODES:
            raise ValueError(f"conv must be one of {CONV_MODES} or None, got {conv!r}")
        self.conv = conv
        self.weight_caches: list[_WeightCache] = []  # the reshaped weights it keeps (benchmarks count them)
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
                            self._forwards[layer] = _channels_last_conv2d(layer, self._weight_cache())
        if chunk_frames is not None:
            if chunk_frames < 1:
                raise ValueError(f"chunk_frames must be >= 1 or None, got {chunk_frames}")
            if isinstance(module, WanDecoder3d):
                self._forwards[module] = _decoder_forward(module, chunk_frames)
        if subpixel_upsample:
            for m in module.modules():
                if isinstance(m, WanResample) and _upsample_conv_eligible(m.resample):
                    self._forwards[m.resample] = _upsample_conv_forward(m.resample, self._weight_cache())
        self._active = False

    def _weight_cache(self) -> _WeightCache:
        self.weight_caches.append(_WeightCache())
        return self.weight_caches[-1]

    def _conv_forward(self, conv: WanCausalConv3d):
        cache = self._weight_cache()

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
