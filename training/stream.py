"""Teacher data rendered on the fly: every batch is new world clips, encoded as the ``encode`` stage would write them.

With ``data.stream = true`` the teacher stage reads no latent folder. Step ``s`` (1-based) on rank ``r`` of ``R``
trains on the clips numbered ``((s - 1) R + r) B + [0, B)`` (B = ``teacher.batch_size``), and clip ``n`` is the world
scene of seed ``STREAM_FIRST_SEED + n``: seeds the ``encode`` stage never uses (it takes ``seed * 1e6 + i``, below
``STREAM_FIRST_SEED``), so a streamed clip is neither a clip of the encoded folder nor one seen before in the run.
Batches depend only on the step, so a resumed run sees what an unbroken one would.

The clips are drawn where the model trains, in the training process: drawn on the CPU by DataLoader workers, a batch
of 32 float clips of 81 x 128 x 128 would be half a gigabyte to pass between processes and to the device every step.
"""

from __future__ import annotations

import torch

from ..pipelines.vae_streaming import encode_video
from .config import TrainingConfig
from .encode import load_encoders, render_world_clip

STREAM_FIRST_SEED = 2**31  # world seeds are 32-bit; the encode stage's are below this
STREAM_CLIPS = 2**31  # clip numbers a stream can reach before its seeds would wrap around


def stream_clip_numbers(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """The clip numbers of ``step`` (1-based) on ``rank``: consecutive, disjoint across steps and ranks."""
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")
    first = ((step - 1) * world_size + rank) * batch_size
    if first + batch_size > STREAM_CLIPS:
        raise ValueError(f"step {step} needs clip numbers beyond {STREAM_CLIPS}: the stream's seeds would repeat")
    return range(first, first + batch_size)


class WorldLatentStream:
    """Batches of fresh world clips as latents and prompt embeddings, made where the model trains.

    ``batch(step)`` returns what :meth:`LatentFolder.collate` would for the same clips encoded by the ``encode`` stage:
    ``latents`` [B, C, F, H, W] (normalised, float32), ``prompt_embeds`` [B, L, D], ``caption`` (list of B).
    """

    def __init__(self, config: TrainingConfig, device, batch_size: int, rank: int = 0, world_size: int = 1):
        e = config.encode
        if e.source != "world":
            raise ValueError(f"data.stream renders world clips; encode.source is {e.source!r} (use an encoded folder)")
        self.config, self.device, self.batch_size = config, torch.device(device), batch_size
        self.rank, self.world_size = rank, world_size
        self.encoders = load_encoders(config, self.device)
        with torch.no_grad():
            self._negative = self.encoders.encode_prompt(e.negative_prompt, max_sequence_length=e.max_sequence_length)[0]

    def negative_prompt_embeds(self) -> torch.Tensor:
        """[L, D] embedding of ``encode.negative_prompt`` (classifier-free guidance, caption dropout)."""
        return self._negative

    def describe(self) -> str:
        e = self.config.encode
        return f"new {e.num_frames}x{e.height}x{e.width} world clips every step, drawn on {self.device}"

    @torch.no_grad()
    def batch(self, step: int) -> dict:
        numbers = stream_clip_numbers(step, self.batch_size, self.rank, self.world_size)
        clips = [render_world_clip(self.config, STREAM_FIRST_SEED + n, self.device) for n in numbers]
        videos = torch.stack([video for video, _ in clips])
        captions = [caption for _, caption in clips]
        with torch.autocast(self.device.type, enabled=False):  # encoded as the encode stage does, not in the
            latents = encode_video(self.encoders.vae, videos)  # training step's mixed precision
            embeds = self.encoders.encode_prompt(captions, max_sequence_length=self.config.encode.max_sequence_length)
        return {"latents": latents.float(), "prompt_embeds": embeds.float(), "caption": captions}
