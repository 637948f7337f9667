"""Streaming decode (and encode) with diffusers' ``AutoencoderKLWan``.

The Wan VAE decoder is causal in time: ``AutoencoderKLWan._decode`` feeds it one latent frame at a time while every
causal 3-D convolution keeps its last input frames in a feature cache (a list with one slot per causal conv). Keeping
such a list alive between blocks makes block-by-block decoding equal to one full decode. ``vae.decode`` cannot be used
for this: it resets the VAE's own cache at its start and end. The first latent frame of a video decodes to 1 video
frame, every later one to ``scale_factor_temporal`` (4).

Latents in this package are *normalised*: ``(z - latents_mean) / latents_std`` per channel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from .vae_fast import WanFastPath

FULL_RESOLUTION_CHUNK = 2  # frames at a time through the decoder's full-resolution stages on a GPU (WanFastPath)


def _check_5d(tensor: torch.Tensor, name: str, channels: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.ndim != 5:
        raise ValueError(f"{name} must be 5-D {layout}, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels {layout}, got shape {tuple(tensor.shape)}")


def latent_stats(mean, std, device=None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean and std (C floats each, or tensors of them) as [1, C, 1, 1, 1] tensors."""
    mean = torch.as_tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    std = torch.as_tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    return mean, std


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # At least float32 for the affine map, so bf16/fp16 latents are rounded once, at the end.
    return torch.promote_types(tensor.dtype, torch.float32)


def normalize_with(z: torch.Tensor, mean, std) -> torch.Tensor:
    """Raw VAE latents z [B, C, F, H, W] -> normalised ``(z - mean) / std`` with the per-channel statistics ``mean``,
    ``std`` (C floats each, or [1, C, 1, 1, 1] tensors); same dtype and device as ``z``."""
    _check_5d(z, "z", len(torch.as_tensor(mean).flatten()), "[B, C, F, H, W]")
    mean, std = latent_stats(mean, std, z.device, _compute_dtype(z))
    return ((z.to(mean.dtype) - mean) / std).to(z.dtype)


def denormalize_with(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised latents [B, C, F, H, W] -> raw VAE latents ``latents * std + mean`` (same dtype and device)."""
    _check_5d(latents, "latents", len(torch.as_tensor(mean).flatten()), "[B, C, F, H, W]")
    mean, std = latent_stats(mean, std, latents.device, _compute_dtype(latents))
    return (latents.to(mean.dtype) * std + mean).to(latents.dtype)


def normalize_latents(z: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Raw VAE latents z [B, C, F, H, W] -> normalised ``(z - mean) / std`` with the VAE's statistics."""
    return normalize_with(z, vae.config.latents_mean, vae.config.latents_std)


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    """Normalised latents [B, C, F, H, W] -> raw VAE latents ``latents * std + mean`` with the VAE's statistics."""
    return denormalize_with(latents, vae.config.latents_mean, vae.config.latents_std)


def _prepare_vae(vae: AutoencoderKLWan) -> tuple[torch.device | None, torch.dtype]:
    """Run an accelerate offload hook if one is attached (what diffusers' ``@apply_forward_hook`` does for
    ``vae.decode``), then say where the VAE computes: (device or None when its weights are not materialised, dtype)."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)
    device = vae.post_quant_conv.weight.device
    return (None if device.type == "meta" else device), vae.dtype


@dataclass(frozen=True)
class DecoderSnapshot:
    """A block-by-block decoder's state (the causal memory carried between blocks and its counts)."""

    state: list
    stream_shape: tuple[int, int, int] | None
    latent_frames_decoded: int
    frames_decoded: int


def _cloned(state):
    """A copy of a decoder state: tensors cloned, lists and tuples copied, anything else (None, markers) shared."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, (list, tuple)):
        return type(state)(_cloned(item) for item in state)
    return state


class BlockStreamDecoder:
    """The bookkeeping every block-by-block decoder shares: one video's stream state, its shape and frame counts.

    Subclasses give ``_new_state()`` (the causal memory carried between blocks), ``_check(latents)`` and
    ``_decode_next(latents, state, first)`` (decode one block, updating ``state``; ``first``: the stream's first block).
    """

    def reset(self) -> None:
        """Forget the stream: the next ``decode_block`` starts a new video."""
        self._state: list = self._new_state()
        self._stream_shape: tuple[int, int, int] | None = None
        self.latent_frames_decoded = 0
        self.frames_decoded = 0

    @property
    def first_block(self) -> bool:
        """True until a block has been decoded since construction or ``reset``."""
        return self.latent_frames_decoded == 0

    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next block of the stream.

        Args:
            latents: normalised latents [B, C, f, h, w], f >= 1. Batch size and h, w must stay the same for the
                whole stream.

        Returns:
            video [B, 3, T, s*h, s*w] in [-1, 1] (s = 8 for Wan2.1), in the decoder's dtype, with T = 1 + 4 (f - 1)
            for the stream's first block and 4 f afterwards.
        """
        self._check(latents)
        shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        if self._stream_shape is not None and shape != self._stream_shape:
            raise ValueError(
                f"latents [B, C, f, h, w] = {tuple(latents.shape)} do not continue this stream "
                f"(batch {self._stream_shape[0]}, h x w = {self._stream_shape[1]} x {self._stream_shape[2]}); "
                "call reset() to start a new video"
            )
        video = self._decode_next(latents, self._state, first=self.first_block)
        self._stream_shape = shape
        self.latent_frames_decoded += latents.shape[2]
        self.frames_decoded += video.shape[2]
        return video

    def snapshot(self) -> "DecoderSnapshot":
        """A copy of the stream's state between two blocks, to :meth:`restore` later (rewinding a video)."""
        return DecoderSnapshot(_cloned(self._state), self._stream_shape, self.latent_frames_decoded,
                               self.frames_decoded)

    def restore(self, snapshot: "DecoderSnapshot") -> None:
        """Go back to ``snapshot``: the next ``decode_block`` continues the stream from there."""
        self._state = _cloned(snapshot.state)
        self._stream_shape, self.latent_frames_decoded, self.frames_decoded = (
            snapshot.stream_shape, snapshot.latent_frames_decoded, snapshot.frames_decoded)

    def _new_state(self) -> list:
        raise NotImplementedError

    def _check(self, latents: torch.Tensor) -> None:
        raise NotImplementedError

    def _decode_next(self, latents: torch.Tensor, state: list, first: bool) -> torch.Tensor:
        raise NotImplementedError


class WanStreamingDecoder(BlockStreamDecoder):
    """Decodes one video block by block, keeping the VAE's causal-convolution cache between blocks.

    ``decode_block`` of consecutive blocks, concatenated in time, equals ``vae.decode`` of all their (denormalised)
    latents, for any split. The cache lives in this object, never in the ``vae``: the VAE's own ``decode``/``encode``
    may be called at any time, also mid-stream, without disturbing either. VAE tiling (``vae.enable_tiling``) does not
    apply here; a batch is decoded whole (the cache holds every batch item).

    Args:
        vae: the ``AutoencoderKLWan`` (Wan2.1; also the patchified Wan2.2 layout).
        fast: run the decoder through :class:`.vae_fast.WanFastPath` (frame-wise 2-D convolutions, fused norms;
            the same video within rounding; on an H200 1.9x faster, on CPU up to 6x for small VAEs; on a GPU the
            full-resolution stages take two frames at a time, for memory), whenever no hooks (accelerate's sequential
            CPU offload, say) sit on the decoder's modules; False: diffusers' own modules.
    """

    def __init__(self, vae: AutoencoderKLWan, fast: bool = True):
        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"vae must be a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        if vae.decoder is None:
            raise ValueError("vae has no decoder")
        self.vae = vae
        self.fast = fast
        self._fast_path: WanFastPath | None = None
        self._stats: dict = {}
        self.reset()

    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole video [B, z_dim, F, h, w] (normalised) -> [B, 3, 1 + 4 (F - 1), s*h, s*w] in [-1, 1].

        Uses a fresh cache of its own: the stream of ``decode_block`` calls, if any, is left as it was.
        """
        self._check(latents)
        return self._decode_next(latents, self._new_state(), first=True)

    def _new_state(self) -> list:  # the causal-convolution cache
        return [None] * self.vae._cached_conv_counts["decoder"]

    def _check(self, latents: torch.Tensor) -> None:
        _check_5d(latents, "latents", self.vae.config.z_dim, f"[B, {self.vae.config.z_dim} (the VAE's z_dim), f, h, w]")
        if latents.shape[2] == 0:
            raise ValueError(f"latents hold no frame: shape {tuple(latents.shape)}")

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        # The stats are cached per device: building them is a host-to-device copy, a sync point on every block.
        key = (latents.device, _compute_dtype(latents))
        if key not in self._stats:
            self._stats[key] = latent_stats(self.vae.config.latents_mean, self.vae.config.latents_std, *key)
        mean, std = self._stats[key]
        return latents.to(mean.dtype) * std + mean

    def _decoding(self):
        """The context the decoder runs in: the fast path or diffusers' own modules."""
        if not self.fast or not WanFastPath.applicable(self.vae.decoder):
            return contextlib.nullcontext()
        if self._fast_path is None:
            # on a GPU, memory is what is short: the full-resolution stages go two frames at a time there (one at a
            # time saves more but is 1.8x slower on an H200: cuDNN runs single 480x832 frames far less efficiently)
            cuda = self.vae.post_quant_conv.weight.device.type == "cuda"
            self._fast_path = WanFastPath(self.vae.decoder, chunk_frames=FULL_RESOLUTION_CHUNK if cuda else None)
        return self._fast_path

    @torch.no_grad()
    def _decode_next(self, latents: torch.Tensor, feat_cache: list, first: bool) -> torch.Tensor:
        vae = self.vae
        device, dtype = _prepare_vae(vae)
        z = self._denormalize(latents).to(device=device or latents.device, dtype=dtype)
        x = vae.post_quant_conv(z)
        frames = []
        with self._decoding():
            for i in range(x.shape[2]):
                # feat_idx restarts at 0 for every latent frame; first_chunk marks the video's frame 0 (Wan2.2).
                frames.append(
                    vae.decoder(x[:, :, i : i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=first and i == 0)
                )
        video = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        return video.clamp_(-1.0, 1.0)


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, video: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """Encode a video to normalised latents (the posterior's mode).

    Args:
        vae: the ``AutoencoderKLWan``.
        video: [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of ``scale_factor_spatial`` (8).
        fast: run the encoder through :class:`.vae_fast.WanFastPath` (the same latents within rounding) unless hooks
            sit on its modules; False: diffusers' own modules.

    Returns:
        normalised latents [B, z_dim, 1 + k, H/8, W/8] in the VAE's dtype, on the VAE's device.
    """
    _check_5d(video, "video", 3, "[B, 3, T, H, W]")
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    frames, height, width = video.shape[2:]
    if (frames - 1) % temporal:
        raise ValueError(f"video must have 1 + {temporal}k frames, got {frames} (shape {tuple(video.shape)})")
    if height % spatial or width % spatial:
        raise ValueError(f"video height and width must be multiples of {spatial}, got {height} x {width}")
    device, dtype = _prepare_vae(vae)
    path = WanFastPath(vae.encoder) if fast and WanFastPath.applicable(vae.encoder) else contextlib.nullcontext()
    with path:
        z = vae.encode(video.to(device=device or video.device, dtype=dtype)).latent_dist.mode()
    return normalize_latents(z, vae)
