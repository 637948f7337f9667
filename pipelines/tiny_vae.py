"""A tiny Wan2.1 VAE for fast previews: the TAEHV architecture (madebyollin/taehv), loaded from user-supplied weights.

The full Wan VAE decode dominates end-to-end time (about 2 s for 81 frames at 480x832 on an H100). TAEHV is a small
convolutional autoencoder trained to decode the same latents; its Wan2.1 weights are published as ``taew2_1.pth``
(and ``safetensors/taew2_1.safetensors``) in the madebyollin/taehv repository. Nothing is downloaded here: the user
passes the file to :meth:`TinyWanVAE.from_single_file`.

Conventions (checked against the public code):

- TAEHV consumes the latents the diffusion model works in, with no scale or shift. Those are this package's
  *normalised* latents ``(z - latents_mean) / latents_std``, so they go in as they are (the Wan VAE path has to
  de-normalise first; this one must not).
- TAEHV's frames are in [0, 1]; :class:`TinyWanVAE` returns [-1, 1] like ``AutoencoderKLWan``, so the pipeline's
  post-processing is the same for both decoders.
- Layout here is diffusers' [B, C, T, H, W]; inside, the network works on [B, T, C, H, W].

The decoder is causal in time. Each ``MemoryBlock`` sees its input at the current time step and at the previous one
(zeros before the first), two temporal upsamplers turn every latent frame into 4 frames, and the first 3 frames of a
video are dropped, so F latent frames give 1 + 4 (F - 1) frames, as the Wan VAE. Keeping each memory block's last
input between calls makes block-by-block decoding (:class:`TinyWanStreamingDecoder`) equal to one full decode.

Checkpoint layout: the public files are flat state dicts named by position in two sequential stacks,
``encoder.<i>.*`` (18 layers) and ``decoder.<i>.*`` (23 layers); :class:`TinyWanVAE` keeps those positions, so its own
``state_dict()`` is in the public layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .loading import CheckpointError, check_state_dict_matches, read_checkpoint_tensors
from .vae_streaming import BlockStreamDecoder

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # Wan2.1
DECODER_WIDTHS = (256, 128, 64, 64)  # taew2_1: channels of the 3 decoder stages and of the output head
ENCODER_WIDTH = 64
DECODER_TIME_STRIDES = (1, 2, 2)  # per decoder stage: 1 latent frame -> 4 frames
ENCODER_TIME_STRIDES = (2, 2, 1)  # per encoder stage: 4 frames -> 1 latent frame
BLOCKS_PER_STAGE = 3
TEMPORAL_SCALE = 4
SPATIAL_SCALE = 8
# positions of the layers whose weights tell the widths (see _decoder_layers / _encoder_layers)
_WIDTH_KEYS = ("decoder.1.weight", "decoder.8.weight", "decoder.14.weight", "decoder.20.weight", "decoder.22.weight")
# the other TAEHV files: same key names, different latent spaces; a file name is all that tells some of them apart
_OTHER_TAE_FILES = ("taehv", "taecvx", "taeos", "taeltx", "taeh3", "taew2_2")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """Smoothly limits latents to (-3, 3): ``3 tanh(x / 3)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemoryBlock(nn.Module):
    """Residual 3x3-conv block that also sees the previous time step's input (its "memory").

    ``forward(x, past)``: x, past [N, C_in, H, W] -> [N, C_out, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(2 * in_channels, out_channels), nn.ReLU(inplace=True),
            _conv3x3(out_channels, out_channels), nn.ReLU(inplace=True),
            _conv3x3(out_channels, out_channels),
        )
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TemporalUpsample(nn.Module):
    """Every time step becomes ``stride`` time steps: a 1x1 conv to ``stride`` groups of channels, group j being
    output step ``stride * t + j``. [B, T, C, H, W] -> [B, stride * T, C, H, W]."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        return self.conv(x.reshape(b * t, c, h, w)).reshape(b, t * self.stride, c, h, w)


class TemporalDownsample(nn.Module):
    """Every ``stride`` consecutive time steps become one: their channels side by side (earliest first), then a 1x1
    conv. [B, T, C, H, W] -> [B, T / stride, C, H, W] (T a multiple of ``stride``)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        return self.conv(x.reshape(b * t // self.stride, self.stride * c, h, w)).reshape(b, t // self.stride, c, h, w)


def _decoder_layers(latent_channels: int, widths) -> list[nn.Module]:
    layers: list[nn.Module] = [SoftClamp(), _conv3x3(latent_channels, widths[0]), nn.ReLU(inplace=True)]
    for stage, time_stride in enumerate(DECODER_TIME_STRIDES):
        width = widths[stage]
        layers += [MemoryBlock(width, width) for _ in range(BLOCKS_PER_STAGE)]
        layers += [
            nn.Upsample(scale_factor=2),  # nearest
            TemporalUpsample(width, time_stride),
            _conv3x3(width, widths[stage + 1], bias=False),
        ]
    layers += [nn.ReLU(inplace=True), _conv3x3(widths[-1], 3)]
    return layers


def _encoder_layers(latent_channels: int, width: int) -> list[nn.Module]:
    layers: list[nn.Module] = [_conv3x3(3, width), nn.ReLU(inplace=True)]
    for time_stride in ENCODER_TIME_STRIDES:
        layers += [TemporalDownsample(width, time_stride), _conv3x3(width, width, stride=2, bias=False)]
        layers += [MemoryBlock(width, width) for _ in range(BLOCKS_PER_STAGE)]
    layers.append(_conv3x3(width, latent_channels))
    return layers


def run_causal(layers: nn.Sequential, x: torch.Tensor, memory: list | None = None) -> torch.Tensor:
    """Apply a stack of TAEHV layers to a clip, all its time steps at once.

    Args:
        layers: the encoder or decoder stack.
        x: [B, T, C, H, W].
        memory: one slot per layer. A ``MemoryBlock``'s slot holds its input at the last time step seen so far
            ([B, 1, C, H, W], or None at the start of a stream); it is read as the "previous step" of this clip's first
            step and updated in place. None: a clip on its own (the past of its first step is zero).

    Returns:
        [B, T', C', H', W'].
    """
    for index, layer in enumerate(layers):
        b, t = x.shape[:2]
        if isinstance(layer, MemoryBlock):
            previous = memory[index] if memory is not None else None
            if previous is None:
                previous = torch.zeros_like(x[:, :1])
            past = torch.cat([previous, x[:, :-1]], dim=1)
            if memory is not None:
                memory[index] = x[:, -1:].clone()  # a copy: a view would keep the whole clip alive
            x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (b, t))
        elif isinstance(layer, (TemporalUpsample, TemporalDownsample)):
            x = layer(x)
        else:
            x = layer(x.flatten(0, 1)).unflatten(0, (b, t))
    return x


class TinyWanVAE(nn.Module):
    """TAEHV-architecture autoencoder for Wan2.1 latents (random weights until loaded; see :meth:`from_single_file`).

    Args:
        latent_channels: 16 for Wan2.1.
        decoder_widths: channels of the three decoder stages and of the output head; ``taew2_1``: (256, 128, 64, 64).
        encoder_width: channels of the encoder (``taew2_1``: 64); ``with_encoder=False`` builds the decoder only.

    The per-layer positions follow the public files, so ``state_dict()`` has their key names and shapes.
    """

    def __init__(
        self,
        latent_channels: int = LATENT_CHANNELS,
        decoder_widths: tuple[int, int, int, int] = DECODER_WIDTHS,
        encoder_width: int = ENCODER_WIDTH,
        with_encoder: bool = True,
    ):
        super().__init__()
        if len(decoder_widths) != 4:
            raise ValueError(f"decoder_widths must hold 4 channel counts, got {tuple(decoder_widths)}")
        self.latent_channels = latent_channels
        self.decoder_widths = tuple(int(w) for w in decoder_widths)
        self.encoder_width = encoder_width
        self.encoder = nn.Sequential(*_encoder_layers(latent_channels, encoder_width)) if with_encoder else None
        self.decoder = nn.Sequential(*_decoder_layers(latent_channels, self.decoder_widths))
        # raw decoder frames before the first video frame: of the first latent frame's 4, only the last is kept
        self.frames_to_trim = TEMPORAL_SCALE - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    # -- loading ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_single_file(
        cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> "TinyWanVAE":
        """Load ``taew2_1.pth`` / ``taew2_1.safetensors`` (or a file in the same layout, of any widths).

        ``.pth`` files are read with ``torch.load(weights_only=True)`` only. A file without ``encoder.*`` keys gives a
        decoder-only model. Raises :class:`~oneforcing.pipelines.loading.CheckpointError` (a ``ValueError``) naming the
        missing, unexpected or mis-shaped keys when the layout is not TAEHV's Wan2.1 one.
        """
        path = Path(path)
        name = path.name.lower()
        if any(other in name for other in _OTHER_TAE_FILES):
            logger.warning("%s: the name suggests a TAEHV file for another model; Wan2.1 (and Wan2.2 14B) use "
                           "taew2_1. Decoded colours will be wrong if the latent spaces differ.", path)
        state_dict = read_checkpoint_tensors(path)
        model = cls(**infer_tiny_vae_config(state_dict, path))
        model.load_public_state_dict(state_dict, path)
        return model.to(device=device, dtype=dtype).eval()

    def load_public_state_dict(self, state_dict: Mapping[str, torch.Tensor], path="<state dict>") -> None:
        """Load a state dict in the public TAEHV layout (checked first: every key, every shape)."""
        state_dict = dict(state_dict)
        if self.encoder is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
        for index, layer in enumerate(self.decoder):
            # a file trained with a larger time stride still fits: keep the last step's channels, as the public
            # loader does (those are the ones that survive the first-frame trim)
            key = f"decoder.{index}.conv.weight"
            if isinstance(layer, TemporalUpsample) and key in state_dict:
                rows, wanted = state_dict[key].shape[0], layer.conv.weight.shape[0]
                if rows > wanted and rows % wanted == 0:
                    state_dict[key] = state_dict[key][-wanted:]
        check_state_dict_matches(self, state_dict, path)
        self.load_state_dict(state_dict)

    # -- decoding -----------------------------------------------------------------------------------------------------
    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor [B, C, F, h, w], got {type(latents).__name__}")
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, F, h, w] (normalised), "
                             f"got shape {tuple(latents.shape)}")
        if latents.shape[2] == 0:
            raise ValueError(f"latents hold no frame: shape {tuple(latents.shape)}")

    def decode_frames(self, latents: torch.Tensor, memory: list | None = None) -> torch.Tensor:
        """Raw decoder output, nothing trimmed: normalised latents [B, C, f, h, w] -> [B, 3, 4 f, 8 h, 8 w] in [-1, 1]
        (the model's dtype and device). ``memory``: see :func:`run_causal` (one slot per decoder layer)."""
        self._check_latents(latents)
        x = latents.to(device=self.device, dtype=self.dtype).transpose(1, 2)
        frames = run_causal(self.decoder, x, memory)  # [B, 4f, 3, 8h, 8w], about 0..1
        return frames.clamp(0.0, 1.0).mul_(2.0).sub_(1.0).transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole video: normalised latents [B, C, F, h, w] -> [B, 3, 1 + 4 (F - 1), 8 h, 8 w] in [-1, 1], the same
        frame count and size as ``AutoencoderKLWan``."""
        return self.decode_frames(latents)[:, :, self.frames_to_trim:]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] (H, W multiples of 8) -> normalised latents [B, C, ceil(T / 4), H/8, W/8].

        The clip is padded at its end with copies of its last frame to a multiple of 4 frames (TAEHV's convention),
        so 1 + 4k frames give 1 + k latent frames, as with the Wan VAE.
        """
        if self.encoder is None:
            raise ValueError("this TinyWanVAE was loaded without an encoder (the file held no encoder.* keys)")
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be a torch.Tensor [B, 3, T, H, W], got {tuple(getattr(video, 'shape', ()))}")
        if video.shape[3] % SPATIAL_SCALE or video.shape[4] % SPATIAL_SCALE:
            raise ValueError(f"video height and width must be multiples of {SPATIAL_SCALE}, got {tuple(video.shape)}")
        x = video.to(device=self.device, dtype=self.dtype).transpose(1, 2).add(1.0).mul(0.5)  # [B, T, 3, H, W] 0..1
        missing = -x.shape[1] % TEMPORAL_SCALE
        if missing:
            x = torch.cat([x, x[:, -1:].expand(-1, missing, -1, -1, -1)], dim=1)
        with torch.no_grad():
            return run_causal(self.encoder, x).transpose(1, 2)


def infer_tiny_vae_config(state_dict: Mapping[str, torch.Tensor], path="<state dict>") -> dict:
    """``TinyWanVAE`` arguments read off a public-layout state dict's shapes; a clear error for other layouts."""
    if "decoder.1.conv.0.weight" in state_dict:
        raise CheckpointError(path, "a TAEHV 'super' decoder (taew2_2_super / taehv1_5_super); only the base "
                                    "architecture of taew2_1 (Wan2.1 latents) is supported")
    missing = [k for k in _WIDTH_KEYS if k not in state_dict]
    if missing:
        sample = ", ".join(sorted(state_dict)[:4])
        raise CheckpointError(path, f"not a TAEHV (taew2_1) checkpoint: missing keys {', '.join(missing)}; the "
                                    f"file's keys begin {sample} (expected encoder.<i>.* and decoder.<i>.*)")
    shapes = {k: tuple(state_dict[k].shape) for k in _WIDTH_KEYS}
    if any(len(s) != 4 for s in shapes.values()):
        raise CheckpointError(path, f"not a TAEHV checkpoint: expected conv weights at {', '.join(_WIDTH_KEYS)}, "
                                    f"got shapes {shapes}")
    latent_channels = shapes["decoder.1.weight"][1]
    output_channels = shapes["decoder.22.weight"][0]
    if output_channels != 3:
        raise CheckpointError(path, f"the decoder outputs {output_channels} channels per pixel, i.e. a pixel-shuffle "
                                    "patch size above 1 (taew2_2 / taehv1_5 / taeltx); only taew2_1's layout "
                                    "(3 channels, Wan2.1) is supported")
    if latent_channels != LATENT_CHANNELS:
        raise CheckpointError(path, f"the decoder takes {latent_channels}-channel latents; Wan2.1 latents have "
                                    f"{LATENT_CHANNELS} (use taew2_1)")
    widths = (shapes["decoder.1.weight"][0], shapes["decoder.8.weight"][0], shapes["decoder.14.weight"][0],
              shapes["decoder.20.weight"][0])
    with_encoder = any(k.startswith("encoder.") for k in state_dict)
    encoder_width = ENCODER_WIDTH
    if with_encoder and "encoder.0.weight" in state_dict and state_dict["encoder.0.weight"].ndim == 4:
        encoder_width = state_dict["encoder.0.weight"].shape[0]
    return dict(latent_channels=latent_channels, decoder_widths=widths, encoder_width=encoder_width,
                with_encoder=with_encoder)


class TinyWanStreamingDecoder(BlockStreamDecoder):
    """Decodes one video block by block with a :class:`TinyWanVAE`; the same interface as ``WanStreamingDecoder``.

    ``decode_block`` of consecutive blocks, concatenated in time, equals ``vae.decode`` of all their latents, for any
    split: each memory block's last input is kept here between blocks (the model itself holds no state). Blocks are
    normalised latents [B, 16, f, h, w]; the video comes in the tiny VAE's dtype.
    """

    def __init__(self, vae: TinyWanVAE):
        if not isinstance(vae, TinyWanVAE):
            raise TypeError(f"vae must be a TinyWanVAE, got {type(vae).__name__}")
        self.vae = vae
        self.reset()

    def _new_state(self) -> list:  # one memory slot per decoder layer
        return [None] * len(self.vae.decoder)

    def _check(self, latents: torch.Tensor) -> None:
        self.vae._check_latents(latents)

    @torch.no_grad()
    def _decode_next(self, latents: torch.Tensor, memory: list, first: bool) -> torch.Tensor:
        video = self.vae.decode_frames(latents, memory)
        return video[:, :, self.vae.frames_to_trim:] if first else video

    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole video [B, 16, F, h, w] -> [B, 3, 1 + 4 (F - 1), 8 h, 8 w]; the stream, if any, is left as it was."""
        return self.vae.decode(latents)
