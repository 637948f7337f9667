"""Stages ``ode-pairs`` and ``ode-init``: teacher ODE trajectories, then regression of the block-causal student.

ode-pairs: the teacher integrates the flow ODE from noise to x0 (Euler, classifier-free guidance), and the states at
the student's timesteps are kept, with the endpoint. ode-init: each block of the student's input is the stored state
at a random one of its timesteps (independently per block), the student runs once over the whole sequence with the
block-causal mask, and its x0 prediction is regressed onto the endpoint.
"""

from __future__ import annotations

import torch

from ..pipelines.layout import BlockLayout
from ..pipelines.scheduling_one_forcing import OneForcingScheduler
from .config import TrainingConfig
from .data import LatentFolder, OdePairFolder, batch_indices, write_ode_pair
from .flow import guided, ode_sigmas, predict_x0, randn, step_generator
from .losses import x0_regression_loss
from .runner import StageRun, load_transformer
from .single_model import train_single_model


def student_scheduler(config: TrainingConfig) -> OneForcingScheduler:
    s = config.scheduler
    return OneForcingScheduler(
        shift=s.shift, denoising_timesteps=list(s.denoising_timesteps),
        first_block_timesteps=list(s.first_block_timesteps) if s.first_block_timesteps else None,
    )


def student_timesteps(scheduler: OneForcingScheduler) -> list[float]:
    """Every timestep the student uses (first block's and the others'), decreasing."""
    values = set(scheduler.block_timesteps(0).tolist()) | set(scheduler.block_timesteps(1).tolist())
    return sorted(values, reverse=True)


# -- ode-pairs --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_trajectory(
    teacher,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    *,
    keep_timesteps: list[float],
    num_inference_steps: int = 48,
    shift: float = 8.0,
    guidance_scale: float = 6.0,
) -> torch.Tensor:
    """Integrate the teacher's flow ODE from ``noise`` (sigma 1) to x0.

    Args:
        noise: [B, C, F, H, W]; prompt_embeds / negative_embeds: [B, L, D] (negative unused when guidance is 1).
        keep_timesteps: timesteps (0..1000] whose states are returned.
    Returns:
        states [B, len(keep_timesteps) + 1, C, F, H, W] float32: the state at each kept timestep, then x0.
    """
    sigmas, keep = ode_sigmas(num_inference_steps, shift, [t / 1000.0 for t in keep_timesteps])
    batch = noise.shape[0]
    guide = guidance_scale != 1.0
    if guide and negative_embeds is None:
        raise ValueError("classifier-free guidance needs the negative prompt embeddings")
    context = torch.cat([prompt_embeds, negative_embeds]) if guide else prompt_embeds
    dtype = next(teacher.parameters()).dtype
    x = noise.float()
    kept = {}
    for i in range(len(sigmas) - 1):
        if i in keep:
            kept[i] = x
        t = torch.full((batch * (2 if guide else 1),), float(sigmas[i]) * 1000.0, device=x.device)
        model_in = torch.cat([x, x]) if guide else x
        flow = teacher(model_in.to(dtype), t, context.to(dtype), attention_mode="bidirectional").sample.float()
        if guide:
            flow = guided(*flow.chunk(2), guidance_scale)
        x = x + float(sigmas[i + 1] - sigmas[i]) * flow
    return torch.stack([kept[i] for i in keep] + [x], dim=1)


def generate_ode_pairs(config: TrainingConfig) -> dict:
    section = config.ode_pairs
    run = StageRun(config, "ode_pairs", "never")
    data = LatentFolder(config.latents_dir())
    negative = data.negative_prompt_embeds() if section.guidance_scale != 1.0 else None
    teacher_path = section.teacher or config.teacher_path()
    teacher = load_transformer(teacher_path, config, what="teacher").eval().requires_grad_(False).to(run.device)
    keep = student_timesteps(student_scheduler(config))
    mine = [i for i in range(section.num_pairs) if i % run.world_size == run.rank]
    todo = [i for i in mine if not (run.dir / f"pair_{i:06d}.safetensors").is_file()]
    run.print(f"[ode_pairs] {section.num_pairs} trajectories ({len(mine) - len(todo)} of this rank's already there), "
              f"{section.num_inference_steps} teacher steps, guidance {section.guidance_scale}, keep t={keep}")
    for chunk_start in range(0, len(todo), section.batch_size):
        chunk = todo[chunk_start : chunk_start + section.batch_size]
        items = [data[i % len(data)] for i in chunk]
        embeds = torch.stack([item["prompt_embeds"] for item in items]).to(run.device, torch.float32)
        noise = torch.stack([
            randn(data.shapes["latents"], step_generator(config.seed, i, 1, device=run.device), run.device)
            for i in chunk
        ])
        neg = negative.to(run.device, torch.float32).expand(len(chunk), -1, -1) if negative is not None else None
        with run.autocast():
            states = teacher_trajectory(
                teacher, noise, embeds, neg, keep_timesteps=keep, num_inference_steps=section.num_inference_steps,
                shift=section.shift, guidance_scale=section.guidance_scale,
            )
        for i, item, trajectory in zip(chunk, items, states):
            write_ode_pair(run.dir / f"pair_{i:06d}.safetensors", trajectory, item["prompt_embeds"], keep,
                           item["caption"])
        done = chunk_start + len(chunk)
        run.log(done, {"pairs_this_rank": float(done),
                       "x0_std": float(states[:, -1].std())}, force=True, reduce=False)
    run.accelerator.wait_for_everyone()
    return run.finish({"pairs": section.num_pairs, "folder": str(run.dir), "timesteps": keep})


# -- ode-init ---------------------------------------------------------------------------------------------------------
def block_state_choices(
    scheduler: OneForcingScheduler, stored_timesteps: list[float], num_blocks: int, batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[B, num_blocks] indices into the stored states: for each block a random one of *its* timesteps."""
    stored = torch.tensor(stored_timesteps, dtype=torch.float32)
    choices = torch.empty(batch_size, num_blocks, dtype=torch.long)
    for block in range(num_blocks):
        own = scheduler.block_timesteps(block)
        allowed = [int((stored - t).abs().argmin()) for t in own.tolist()]
        if any(abs(stored_timesteps[a] - t) > 1e-2 for a, t in zip(allowed, own.tolist())):
            raise ValueError(f"the ODE pairs were made for timesteps {stored_timesteps}, not the student's "
                             f"{own.tolist()}: regenerate them")
        pick = torch.randint(len(allowed), (batch_size,), generator=generator, device=generator.device).cpu()
        choices[:, block] = torch.tensor(allowed)[pick]
    return choices


def ode_regression_loss(
    student, states: torch.Tensor, stored_timesteps: list[float], prompt_embeds: torch.Tensor, choices: torch.Tensor,
    frames_per_block: int,
) -> torch.Tensor:
    """MSE of the student's block-causal x0 prediction against the trajectory endpoint.

    Args:
        states: [B, S + 1, C, F, H, W]; choices: [B, num_blocks] index of each block's input state.
    """
    batch, _, _, frames = states.shape[:4]
    sizes = BlockLayout(frames_per_block, frames).block_sizes()
    frame_block = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [F]
    frame_choice = choices[:, frame_block].to(states.device)  # [B, F]
    gather = frame_choice[:, None, None, :, None, None].expand(-1, 1, *states.shape[2:])
    x_t = states.gather(1, gather)[:, 0]  # [B, C, F, H, W]
    timesteps = torch.tensor(stored_timesteps, device=states.device, dtype=torch.float32)[frame_choice]  # [B, F]
    x0_pred, _ = predict_x0(
        student, x_t, timesteps, prompt_embeds, attention_mode="block_causal", frames_per_block=frames_per_block
    )
    return x0_regression_loss(x0_pred, states[:, -1])


def train_ode_init(config: TrainingConfig, resume: str = "auto") -> dict:
    section = config.ode_init
    run = StageRun(config, "ode_init", resume, section.log_every)
    pairs = OdePairFolder(config.pairs_dir())
    scheduler = student_scheduler(config)
    student = load_transformer(section.init or config.teacher_path(), config, what="ode-init student",
                               trained=True)
    frames_per_block = config.model.frames_per_block
    num_blocks = BlockLayout(frames_per_block, pairs.shapes["states"][2]).num_blocks
    run.print(f"[ode_init] {len(pairs)} trajectories, timesteps {pairs.timesteps}, {num_blocks} blocks of "
              f"{frames_per_block} frame(s)")

    def loss_fn(model, step, generator):
        index = batch_indices(len(pairs), section.batch_size, step - 1, seed=config.seed, rank=run.rank,
                              world_size=run.world_size)
        batch = pairs.collate([pairs[i] for i in index])
        choices = block_state_choices(scheduler, pairs.timesteps, num_blocks, len(index), generator)
        loss = ode_regression_loss(
            model, batch["states"].to(run.device, torch.float32), pairs.timesteps,
            batch["prompt_embeds"].to(run.device, torch.float32), choices, frames_per_block,
        )
        return loss, {}

    return train_single_model(run, student, "generator", section, loss_fn)
