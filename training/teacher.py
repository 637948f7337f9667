"""Stage ``teacher``: a bidirectional Wan transformer trained by flow matching on latents.

x_t = (1 - s) x0 + s * noise at one timestep per clip (shift-``timestep_shift`` sampling), target flow noise - x0;
with probability ``caption_dropout`` a clip is conditioned on the negative prompt instead of its caption, so the
teacher also learns the unconditional prediction used by classifier-free guidance. With ``teacher.attention_mode =
"block_causal"`` the same loss fine-tunes a causal student (each block of ``model.frames_per_block`` latent frames
sees only itself and earlier blocks, as when it generates); ``teacher.clean_context`` then gives each clip's first
blocks clean at t = 0, as the student's KV cache holds the blocks it made, and puts the loss on the others only.
"""

from __future__ import annotations

import itertools

import torch

from ..pipelines.layout import BlockLayout
from .config import TrainingConfig
from .data import FolderBatches, LatentFolder
from .flow import add_noise, randn, sample_timesteps
from .losses import flow_matching_loss
from .runner import StageRun, load_transformer
from .single_model import train_single_model
from .stream import WorldLatentStream


def teacher_loss(
    model, latents: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    attention_mode: str = "bidirectional",
) -> torch.Tensor:
    """Flow-matching loss of a forward in ``attention_mode``. latents/noise [B, C, F, H, W], timesteps [B], or [B, F]
    with clean context frames at t = 0 (:func:`clean_context_timesteps`), which the loss leaves out."""
    x_t = add_noise(latents, noise, timesteps)
    flow = model(x_t, timesteps, prompt_embeds, attention_mode=attention_mode).sample
    return flow_matching_loss(flow, noise, latents, timesteps > 0 if timesteps.ndim == 2 else None)


def clean_context_timesteps(timesteps: torch.Tensor, layout: BlockLayout, generator: torch.Generator) -> torch.Tensor:
    """Per-frame timesteps [B, F] from per-clip ``timesteps`` [B]: the frames of each clip's first k blocks of
    ``layout`` (k uniform in 0 .. blocks - 1) get t = 0, the rest the clip's timestep."""
    starts = torch.tensor([0, *itertools.accumulate(layout.block_sizes())])
    k = torch.randint(0, len(starts) - 1, (timesteps.shape[0],), generator=generator, device=generator.device)
    clean = torch.arange(layout.num_frames)[None] < starts[k.cpu()][:, None]
    return torch.where(clean.to(timesteps.device), torch.zeros_like(timesteps)[:, None], timesteps[:, None])


def drop_captions(
    prompt_embeds: torch.Tensor, negative: torch.Tensor | None, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Replace each sample's embedding [L, D] by ``negative`` with the given probability."""
    if probability <= 0 or negative is None:
        return prompt_embeds
    drop = torch.rand(prompt_embeds.shape[0], generator=generator, device=generator.device) < probability
    drop = drop.to(prompt_embeds.device)[:, None, None]
    return torch.where(drop, negative.to(prompt_embeds)[None], prompt_embeds)


def train_teacher(config: TrainingConfig, resume: str = "auto") -> dict:
    section = config.teacher
    run = StageRun(config, "teacher", resume, section.log_every)
    data = WorldLatentStream(config, run.device, section.batch_size, run.rank, run.world_size) if config.data.stream \
        else FolderBatches(LatentFolder(config.latents_dir()), section.batch_size, config.seed, run.rank, run.world_size)
    negative = data.negative_prompt_embeds().to(run.device, torch.float32) if section.caption_dropout > 0 else None
    model = load_transformer(section.init, config, what="teacher", trained=True)
    run.print(f"[teacher] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {data.describe()}, "
              f"{run.world_size} process(es) on {run.device}")

    def loss_fn(model, step, generator):
        batch = data.batch(step)
        latents = batch["latents"].to(run.device, torch.float32)
        embeds = drop_captions(batch["prompt_embeds"].to(run.device, torch.float32), negative, section.caption_dropout, generator)
        timesteps = sample_timesteps(
            latents.shape[0], shift=section.timestep_shift, min_timestep=section.min_timestep,
            max_timestep=section.max_timestep, generator=generator, device=run.device,
        )
        if section.clean_context:
            layout = BlockLayout(config.model.frames_per_block, latents.shape[2])
            timesteps = clean_context_timesteps(timesteps, layout, generator)
        noise = randn(latents.shape, generator, run.device)
        return teacher_loss(model, latents, embeds, timesteps, noise, section.attention_mode), {}

    return train_single_model(run, model, "transformer", section, loss_fn)
