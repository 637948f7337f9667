"""Stage ``distill``: self-forcing DMD with the One-Forcing adversarial critic.

Generator step (every ``critic_steps_per_generator_step``-th iteration):
  1. the student generates the whole video with the inference rollout (its own KV cache), stopping every block at one
     random exit step shared by all blocks; only the exit forwards record autograd, no gradient crosses blocks;
  2. DMD: the video is noised at t (shift 5, clamped to [20, 980]); the frozen teacher with guidance
     ``cond + g (cond - uncond)`` and the critic predict x0; the loss pushes the video along (x0_fake - x0_real),
     normalised by mean |x - x0_real|;
  3. adversarial (unless ``--no-gan``): the same noised video goes through the critic and the register head, loss
     ``generator_weight * softplus(-D)``; critic and head are frozen for this step, the gradient reaches the student.
Critic step (every iteration): a new no-grad rollout; flow-matching loss of the critic on the generated video, plus
``discriminator_weight * (softplus(-D(real)) + softplus(D(fake)))`` with real latents noised at the same t with the
same noise; optional R1 / R2 finite-difference penalties. The teacher never trains.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..pipelines.scheduling_one_forcing import OneForcingScheduler
from .config import DistillConfig, TrainingConfig
from .data import LatentFolder, batch_indices
from .discriminator import RegisterDiscriminator, critic_logits
from .ema import ExponentialMovingAverage
from .flow import add_noise, guided, predict_x0, randn, sample_timesteps, step_generator
from .losses import (
    discriminator_adversarial_loss,
    dmd_loss,
    flow_matching_loss,
    generator_adversarial_loss,
    perturbation_penalty,
)
from .ode import student_scheduler
from .rollout import self_forcing_blocks
from .runner import StageRun, gathered_state, clip_and_step, load_transformer, make_optimizer, trainable

# random streams of one iteration (see flow.step_generator)
_GEN_NOISE, _GEN_LOSS, _CRITIC_NOISE, _CRITIC_LOSS, _EXIT = 10, 11, 12, 13, 100


class ForwardThrough:
    """The model as the rollout sees it: attributes of the bare model, forward through its wrapper (DDP/FSDP)."""

    def __init__(self, wrapped: torch.nn.Module, model: torch.nn.Module):
        self._wrapped = wrapped
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@dataclass
class DistillModels:
    """``generator`` / ``critic`` / ``discriminator`` may be accelerate-wrapped; ``*_model`` are the bare modules."""

    generator: torch.nn.Module
    teacher: torch.nn.Module
    critic: torch.nn.Module
    discriminator: torch.nn.Module | None = None
    generator_model: torch.nn.Module | None = None
    critic_model: torch.nn.Module | None = None
    discriminator_model: torch.nn.Module | None = None

    def __post_init__(self):
        self.generator_model = self.generator_model or self.generator
        self.critic_model = self.critic_model or self.critic
        self.discriminator_model = self.discriminator_model or self.discriminator


@contextlib.contextmanager
def frozen(*modules):
    """Parameters of ``modules`` do not require grad inside the block (gradients still flow *through* them)."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def self_forcing_rollout(
    generator: torch.nn.Module,
    scheduler: OneForcingScheduler,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    exit_step: int,
    rng: torch.Generator | None = None,
    frames_per_block: int | None = None,
    gradient_blocks: int | None = None,
    generator_model: torch.nn.Module | None = None,
    cache_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The training rollout (:func:`~.rollout.self_forcing_blocks`); returns the video [B, C, F, H, W].

    ``generator`` may be wrapped (its forward is called); ``generator_model`` is then the bare transformer.
    Gradient flows only through the exit forwards (if grad is enabled by the caller).
    """
    model = generator_model or generator
    batch, _, frames, height, width = noise.shape
    kv_cache = model.new_kv_cache(batch, frames, height, width, dtype=cache_dtype, device=noise.device)
    blocks = self_forcing_blocks(
        ForwardThrough(generator, model), scheduler, noise, prompt_embeds, exit_step=exit_step,
        frames_per_block=frames_per_block, generator=rng, kv_cache=kv_cache, gradient_blocks=gradient_blocks,
    )
    return torch.cat([block.latents for block in blocks], dim=2)


def real_score_x0(teacher, x_t, timesteps, prompt_embeds, negative_embeds, guidance_scale: float) -> torch.Tensor:
    """The frozen teacher's guided x0: cond + g * (cond - uncond) (one batched forward)."""
    x0, _ = predict_x0(
        teacher, torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
        torch.cat([prompt_embeds, negative_embeds.expand_as(prompt_embeds)]),
    )
    cond, uncond = x0.chunk(2)
    return guided(cond, uncond, guidance_scale + 1.0)


def loss_timesteps(section: DistillConfig, batch: int, rng: torch.Generator, device, shift: float | None = None):
    """[B] timesteps of the DMD and critic losses: shift ``section.timestep_shift`` (or ``shift``), clamped to
    [min_timestep, max_timestep]."""
    return sample_timesteps(batch, shift=section.timestep_shift if shift is None else shift, generator=rng,
                            min_timestep=section.min_timestep, max_timestep=section.max_timestep, device=device)


def adversarial_timesteps(section: DistillConfig, t: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """[B] timesteps at which the adversarial term noises its videos: ``t`` itself (the DMD or critic loss's), unless
    ``gan.timestep_shift`` gives the term noise levels of its own (drawn from ``rng``; the noise stays the loss's)."""
    if section.gan.timestep_shift is None:
        return t
    return loss_timesteps(section, t.shape[0], rng, t.device, section.gan.timestep_shift)


def generator_loss(
    models: DistillModels,
    x_gen: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    section: DistillConfig,
    rng: torch.Generator,
    use_gan: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DMD (+ adversarial) loss of a generated video ``x_gen`` [B, C, F, H, W] that carries the generator's graph.

    The teacher and the critic's DMD prediction run under ``no_grad``; the adversarial term back-propagates through
    the critic and head into ``x_gen``. Call it, and the backward, inside ``frozen(critic, discriminator)`` so that
    they get no parameter gradient (frozen through the backward: gradient checkpointing recomputes the critic's
    forward then, and must find the same ``requires_grad`` flags).
    """
    t = loss_timesteps(section, x_gen.shape[0], rng, x_gen.device)
    noise = randn(x_gen.shape, rng, x_gen.device)
    x_t = add_noise(x_gen.detach(), noise, t)
    with torch.no_grad():
        x0_fake, _ = predict_x0(models.critic_model, x_t, t, prompt_embeds)
        x0_real = real_score_x0(models.teacher, x_t, t, prompt_embeds, negative_embeds, section.guidance_scale)
    loss, stats = dmd_loss(x_gen, x0_fake, x0_real, section.dmd_eps)
    logs = {"dmd": loss.item(), **stats}
    total = loss.float()
    if use_gan:
        t_adv = adversarial_timesteps(section, t, rng)
        logits, _ = critic_logits(
            models.critic_model, models.discriminator_model, section.gan.feature_layers,
            add_noise(x_gen, noise, t_adv), t_adv, prompt_embeds,
        )
        adversarial = generator_adversarial_loss(logits)
        total = total + section.gan.generator_weight * adversarial
        logs.update(g_adv=adversarial.item(), d_fake_gen=logits.float().mean().item())
    logs["generator_loss"] = total.item()
    return total, logs


def critic_loss(
    models: DistillModels,
    x_gen: torch.Tensor,
    real_latents: torch.Tensor | None,
    prompt_embeds: torch.Tensor,
    section: DistillConfig,
    rng: torch.Generator,
    use_gan: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow matching of the critic on the (detached) generated video, plus the discriminator loss on real vs
    generated latents noised with the same noise at the same :func:`adversarial_timesteps`. Gradient reaches only the
    critic and the head."""
    x_gen = x_gen.detach()
    batch = x_gen.shape[0]
    t = loss_timesteps(section, batch, rng, x_gen.device)
    noise = randn(x_gen.shape, rng, x_gen.device)
    fake_t = add_noise(x_gen, noise, t)
    if not use_gan:
        flow = models.critic(fake_t, t, prompt_embeds, attention_mode="bidirectional").sample
        loss = flow_matching_loss(flow, noise, x_gen)
        return loss, {"critic_flow": loss.item(), "critic_loss": loss.item()}
    if real_latents is None or real_latents.shape != x_gen.shape:
        raise ValueError("the adversarial critic needs real latents shaped like the generated video")
    gan = section.gan
    t_adv = adversarial_timesteps(section, t, rng)
    real_t = add_noise(real_latents.to(x_gen), noise, t_adv)
    # one critic pass: the generated video at t for the flow loss, and both videos at t_adv for the head (the
    # generated one once when the levels are the same)
    fake_adv = fake_t if t_adv is t else add_noise(x_gen, noise, t_adv)
    inputs = [fake_t, real_t] if t_adv is t else [fake_t, fake_adv, real_t]
    logits, flow = critic_logits(
        models.critic, models.discriminator, gan.feature_layers, torch.cat(inputs),
        torch.cat([t] + [t_adv] * (len(inputs) - 1)), torch.cat([prompt_embeds] * len(inputs)),
    )
    logits_fake, logits_real = logits[-2 * batch:].chunk(2)
    flow_loss = flow_matching_loss(flow[:batch], noise, x_gen)
    adversarial = discriminator_adversarial_loss(logits_real, logits_fake)
    total = flow_loss + gan.discriminator_weight * adversarial
    logs = {"critic_flow": flow_loss.item(), "d_adv": adversarial.item(),
            "d_real": logits_real.float().mean().item(), "d_fake": logits_fake.float().mean().item()}

    def head(x):
        return critic_logits(models.critic, models.discriminator, gan.feature_layers, x, t_adv, prompt_embeds)[0]

    if gan.r1_weight > 0:
        r1 = perturbation_penalty(head, real_t, logits_real, gan.r1_sigma, rng)
        total = total + gan.r1_weight * r1
        logs["r1"] = r1.item()
    if gan.r2_weight > 0:
        r2 = 0.5 * perturbation_penalty(head, fake_adv, logits_fake, gan.r2_sigma, rng)
        total = total + gan.r2_weight * r2
        logs["r2"] = r2.item()
    logs["critic_loss"] = total.item()
    return total, logs


def num_exit_steps(scheduler: OneForcingScheduler) -> int:
    return max(len(scheduler.block_timesteps(0)), len(scheduler.block_timesteps(1)))


def build_distill_models(config: TrainingConfig, use_gan: bool, device) -> DistillModels:
    """Load the generator (ODE-init output), the frozen teacher and the critic (teacher weights), build the head."""
    section = config.distill
    teacher_path = section.teacher or config.teacher_path()
    generator = load_transformer(section.generator or config.ode_init_path(), config, what="generator", trained=True)
    teacher = load_transformer(teacher_path, config, what="teacher").eval().requires_grad_(False).to(device)
    critic = load_transformer(section.critic or teacher_path, config, what="critic", trained=True)
    discriminator = None
    if use_gan:
        layers = critic.config.num_layers
        bad = [i for i in section.gan.feature_layers if not 0 <= i < layers]
        if bad:
            raise ValueError(f"distill.gan.feature_layers {bad} outside the critic's {layers} blocks")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 7)
            discriminator = RegisterDiscriminator(
                dim=critic.config.num_attention_heads * critic.config.attention_head_dim,
                feature_layers=list(section.gan.feature_layers), num_heads=section.gan.num_heads,
                ffn_dim=section.gan.ffn_dim,
            )
    return DistillModels(generator=generator, teacher=teacher, critic=critic, discriminator=discriminator)


def train_distill(config: TrainingConfig, resume: str = "auto") -> dict:
    section = config.distill
    use_gan = section.gan.enabled
    run = StageRun(config, "distill", resume, section.log_every)
    data = LatentFolder(config.latents_dir())
    negative = data.negative_prompt_embeds().to(run.device, torch.float32)
    scheduler = student_scheduler(config)
    frames_per_block = config.model.frames_per_block
    models = build_distill_models(config, use_gan, run.device)
    if run.config.mixed_precision != "no":
        models.teacher._cast_keeping_fp32_modules(run.compute_dtype)
    generator, critic, discriminator = models.generator, models.critic, models.discriminator
    trained = {"generator": generator, "critic": critic, **({"discriminator": discriminator} if use_gan else {})}
    ema = ExponentialMovingAverage(generator, section.ema_decay, section.ema_start_step) if section.ema_decay > 0 else None
    emas = {"generator_ema": ema} if ema else {}
    opt_g = make_optimizer(generator.parameters(), section.lr, section.betas, section.weight_decay)
    opt_c = critic_optimizer(section, critic, discriminator)
    checkpoint = run.resume_from()
    if checkpoint is not None:
        run.load_model_states(checkpoint, trained, emas)
    if use_gan:
        generator, critic, discriminator, opt_g, opt_c = run.accelerator.prepare(
            generator, critic, discriminator, opt_g, opt_c)
    else:
        generator, critic, opt_g, opt_c = run.accelerator.prepare(generator, critic, opt_g, opt_c)
    prepared = {"generator": generator, "critic": critic, **({"discriminator": discriminator} if use_gan else {})}
    models = DistillModels(
        generator=generator, teacher=models.teacher, critic=critic, discriminator=discriminator,
        generator_model=run.unwrap(generator), critic_model=run.unwrap(critic),
        discriminator_model=run.unwrap(discriminator) if use_gan else None,
    )
    start = run.load_training_state(checkpoint, {"generator": opt_g, "critic": opt_c}) if checkpoint else 0
    exits = num_exit_steps(scheduler)
    latent_shape = data.shapes["latents"]
    cache_dtype = run.compute_dtype if config.mixed_precision != "no" else None
    run.print(f"[distill] {'DMD + adversarial critic' if use_gan else 'DMD only (--no-gan)'}; generator "
              f"{sum(p.numel() for p in models.generator_model.parameters()) / 1e6:.2f}M, {len(data)} clips "
              f"{list(latent_shape)}, {exits} exit step(s), {run.world_size} process(es) on {run.device}")

    def batch_for(iteration: int, purpose: int):
        index = batch_indices(len(data), section.batch_size, iteration - 1, seed=config.seed, purpose=purpose,
                              purposes=2, rank=run.rank, world_size=run.world_size)
        batch = data.collate([data[i] for i in index])
        return (batch["prompt_embeds"].to(run.device, torch.float32), batch["latents"].to(run.device, torch.float32))

    def rollout(iteration: int, stream: int, embeds: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
        # one exit step per rollout, the same on every rank (keyed by the iteration, not the rank)
        exit_step = int(torch.randint(exits, (1,), generator=step_generator(config.seed, iteration, stream + _EXIT)))
        rng = step_generator(config.seed, iteration, stream, run.rank, run.device)
        noise = randn((embeds.shape[0], *latent_shape), rng, run.device)
        with torch.set_grad_enabled(with_grad):
            return exit_step, self_forcing_rollout(
                generator if with_grad else models.generator_model, scheduler, noise, embeds, exit_step=exit_step,
                rng=rng, frames_per_block=frames_per_block, gradient_blocks=section.gradient_blocks,
                generator_model=models.generator_model, cache_dtype=cache_dtype,
            )

    def save(step: int) -> None:
        run.save_checkpoint(step, prepared, {"generator": opt_g, "critic": opt_c},
                            {k: (e, generator) for k, e in emas.items()})

    last, saved = start, False
    for iteration in range(start + 1, section.steps + 1):
        logs: dict[str, float] = {}
        if (iteration - 1) % section.critic_steps_per_generator_step == 0:
            embeds, _ = batch_for(iteration, 0)
            with frozen(models.critic_model, models.discriminator_model):
                with run.autocast():
                    exit_step, x_gen = rollout(iteration, _GEN_NOISE, embeds, with_grad=True)
                    loss, step_logs = generator_loss(
                        models, x_gen, embeds, negative[None], section,
                        step_generator(config.seed, iteration, _GEN_LOSS, run.rank, run.device), use_gan,
                    )
                run.accelerator.backward(loss)
            logs.update(step_logs, generator_exit_step=exit_step)
            logs["generator_grad_norm"] = clip_and_step(run, generator.parameters(), opt_g, section.max_grad_norm)
            if ema is not None:
                ema.update(models.generator_model, iteration)
        embeds, real = batch_for(iteration, 1)
        with run.autocast():
            exit_step, x_gen = rollout(iteration, _CRITIC_NOISE, embeds, with_grad=False)
            loss, step_logs = critic_loss(
                models, x_gen, real, embeds, section,
                step_generator(config.seed, iteration, _CRITIC_LOSS, run.rank, run.device), use_gan,
            )
        run.accelerator.backward(loss)
        logs.update(step_logs, critic_exit_step=exit_step)
        logs["critic_grad_norm"] = clip_and_step(run, critic_params_of(critic, discriminator), opt_c,
                                                 section.max_grad_norm)
        run.log(iteration, logs)
        last = iteration
        saved = bool(section.save_every) and iteration % section.save_every == 0 and iteration < section.steps
        if saved:
            save(iteration)
        if iteration < section.steps and run.out_of_time(section.max_seconds):
            run.print(f"[distill] stopping at iteration {iteration} of {section.steps}: "
                      f"max_seconds={section.max_seconds} spent")
            break
    if last > start and not saved:  # a stop right after a periodic save has nothing new to save
        save(last)
    run.check_replicas(prepared)
    final_states = {k: e.state_dict() for k, e in emas.items()}
    run.save_final({**prepared, **{k: generator for k in emas}}, final_states)
    exported = export_generator(run, final_states.get("generator_ema"), generator)
    return run.finish({"steps": last, "planned_steps": section.steps, "gan": use_gan, "final": str(run.dir / "final"),
                       "reference_checkpoint": str(exported) if exported else None})


def critic_optimizer(section: DistillConfig, critic, discriminator) -> torch.optim.AdamW:
    """AdamW of the critic step: the critic at ``lr_critic``; the adversarial head (``discriminator``, None without
    the adversarial term) as a parameter group of its own at ``gan.lr`` (null: ``lr_critic``)."""
    optimizer = make_optimizer(critic.parameters(), section.lr_critic, section.betas, section.weight_decay)
    if discriminator is not None:
        head_lr = section.lr_critic if section.gan.lr is None else section.gan.lr
        optimizer.add_param_group({"params": trainable(discriminator.parameters()), "lr": head_lr})
    return optimizer


def critic_params_of(critic, discriminator):
    return list(critic.parameters()) + (list(discriminator.parameters()) if discriminator is not None else [])


def export_generator(run: StageRun, ema_state: dict | None, generator: torch.nn.Module):
    """``final/one_forcing.pt`` in the reference layout ({"generator_ema": {"model.<Wan2.1 key>": tensor}}), from the
    EMA weights (the generator's own weights when there is no EMA); a LoRA run's adapter as ``final/lora.safetensors``
    instead (see ``export.py``)."""
    from ..pipelines.loading import export_reference_checkpoint
    from .export import export_lora

    if getattr(run.unwrap(generator), "peft_config", None):
        source = run.dir / "final" / ("generator_ema" if ema_state is not None else "generator")
        path = export_lora(source, run.dir / "final" / "lora.safetensors") if run.is_main else None
        run.accelerator.wait_for_everyone()
        return path
    state = gathered_state(ema_state) if ema_state is not None else run.accelerator.get_state_dict(generator)
    path = None
    if run.is_main:
        path = export_reference_checkpoint(state, run.dir / "final" / "one_forcing.pt", entry="generator_ema",
                                           config=run.unwrap(generator).config)
    run.accelerator.wait_for_everyone()
    return path
