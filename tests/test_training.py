"""The training recipe's pieces on tiny real models: rollout, gradient flow, losses, optimisation, configs, data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_transformer

from oneforcing import OneForcingScheduler, causal_rollout
from oneforcing.pipelines.layout import BlockLayout
from oneforcing.training.config import ConfigError, DistillConfig, GanConfig, load_config
from oneforcing.training.data import batch_indices
from oneforcing.training.rollout import self_forcing_blocks
from oneforcing.training.discriminator import RegisterDiscriminator, critic_logits
from oneforcing.training.distill import (
    DistillModels,
    adversarial_timesteps,
    critic_loss,
    critic_optimizer,
    frozen,
    generator_loss,
    loss_timesteps,
    self_forcing_rollout,
)
from oneforcing.training.flow import add_noise, ode_sigmas, sample_timesteps
from oneforcing.training.losses import dmd_loss, perturbation_penalty
from oneforcing.training.ode import block_state_choices, ode_regression_loss, teacher_trajectory
from oneforcing.training.teacher import clean_context_timesteps, teacher_loss

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
DIM = 64  # tiny transformer width (2 heads x 32)
LATENT = (16, 3, 8, 8)  # C, F, H, W


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models are latency-bound: one thread is faster, and far faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _embeds(batch=2, seed=0):
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed))


def _noise(batch=2, seed=1, shape=LATENT):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _distill_models(gan=True):
    teacher = make_tiny_transformer(1).requires_grad_(False)
    generator = make_tiny_transformer(2).train()
    critic = make_tiny_transformer(1).train()
    head = None
    if gan:
        torch.manual_seed(3)
        head = RegisterDiscriminator(dim=DIM, feature_layers=[0, 1], num_heads=2, ffn_dim=64)
    return DistillModels(generator=generator, teacher=teacher, critic=critic, discriminator=head)


def _section(**gan):
    return DistillConfig(guidance_scale=3.0, gan=GanConfig(feature_layers=[0, 1], num_heads=2, ffn_dim=64, **gan))


def _grads(module):
    return [p.grad for p in module.parameters()]


def _all_none(module):
    return all(g is None for g in _grads(module))


def _flat_grad(module):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


# -- the training rollout ---------------------------------------------------------------------------------------------
def test_training_rollout_equals_pipeline_inference_rollout():
    pipe = make_tiny_pipeline(seed=4)
    pipe.scheduler = OneForcingScheduler(denoising_timesteps=[1000, 500], first_block_timesteps=[1000, 750, 500, 250])
    embeds, noise = _embeds(1), _noise(1, seed=5)
    expected = pipe(prompt_embeds=embeds, latents=noise, num_frames=9, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(6)).frames
    with torch.enable_grad():
        video = self_forcing_rollout(pipe.transformer, pipe.scheduler, noise, embeds, exit_step=3,
                                     rng=torch.Generator().manual_seed(6))
    assert video.requires_grad
    assert torch.allclose(video, expected, atol=1e-5), (video - expected).abs().max()
    # an earlier exit step is a different (shorter) rollout
    with torch.no_grad():
        early = self_forcing_rollout(pipe.transformer, pipe.scheduler, noise, embeds, exit_step=0,
                                     rng=torch.Generator().manual_seed(6))
    assert (early - expected).abs().max() > 1e-3


def _rollout_blocks(model, exit_step=0, **kwargs):
    scheduler = OneForcingScheduler(denoising_timesteps=[1000, 500])
    return list(self_forcing_blocks(model, scheduler, _noise(1), _embeds(1), frames_per_block=1, exit_step=exit_step,
                                    generator=torch.Generator().manual_seed(0), **kwargs))


def test_no_gradient_crosses_blocks_through_the_cache():
    model = make_tiny_transformer(2).train()
    blocks = _rollout_blocks(model, exit_step=1)
    assert all(b.latents.requires_grad for b in blocks)
    for later in (1, 2):
        (grad,) = torch.autograd.grad(blocks[later].latents.sum(), blocks[0].latents, retain_graph=True,
                                      allow_unused=True, materialize_grads=True)
        assert grad.abs().max() == 0
    # the check is sensitive: the plain rollout under autograd (fused context pass) does connect the blocks
    plain = list(causal_rollout(model, OneForcingScheduler(denoising_timesteps=[1000]), _noise(1), _embeds(1),
                                frames_per_block=1))
    (grad,) = torch.autograd.grad(plain[1].latents.sum(), plain[0].latents, allow_unused=True, materialize_grads=True)
    assert grad.abs().max() > 0


def test_every_block_trains_the_text_projections_and_gradient_blocks_limits_autograd():
    model = make_tiny_transformer(2).train()
    blocks = _rollout_blocks(model)
    blocks[-1].latents.sum().backward()
    # the last block's cross-attention keys are recomputed with autograd, not reused from a no-grad pass
    assert model.blocks[0].attn2.to_k.weight.grad.abs().max() > 0
    assert model.condition_embedder.text_embedder.linear_1.weight.grad.abs().max() > 0
    limited = _rollout_blocks(model, gradient_blocks=1)
    assert [b.latents.requires_grad for b in limited] == [False, False, True]


def test_gradient_checkpointing_gives_the_same_rollout_gradients():
    plain = make_tiny_transformer(2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    for model in (plain, checkpointed):
        video = torch.cat([b.latents for b in _rollout_blocks(model)], dim=2)
        (video ** 2).mean().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


# -- DMD, adversarial terms, critic --------------------------------------------------------------------------------
def test_dmd_loss_gradient_is_the_normalised_score_difference():
    x = torch.randn(2, *LATENT, requires_grad=True)
    fake, real = torch.randn(2, *LATENT), torch.randn(2, *LATENT)
    loss, _ = dmd_loss(x, fake, real)
    loss.backward()
    normaliser = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (fake - real) / normaliser / x.numel()
    assert torch.allclose(x.grad.float(), expected, rtol=1e-5, atol=1e-9)


def test_generator_step_gradients_reach_only_the_generator():
    models = _distill_models()
    section = _section()
    embeds, negative = _embeds(), torch.zeros(1, 8, 32)
    grads = {}
    for gan in (False, True):
        models.generator.zero_grad(set_to_none=True)
        with frozen(models.critic, models.discriminator):
            x_gen = self_forcing_rollout(models.generator, OneForcingScheduler(), _noise(), embeds, exit_step=0,
                                         rng=torch.Generator().manual_seed(0))
            loss, logs = generator_loss(models, x_gen, embeds, negative, section, torch.Generator().manual_seed(1),
                                        gan)
            loss.backward()
        assert ("g_adv" in logs) == gan
        for frozen_model in (models.teacher, models.critic, models.discriminator):
            assert _all_none(frozen_model)
        assert all(p.requires_grad for p in models.critic.parameters())  # unfrozen again after the step
        grads[gan] = _flat_grad(models.generator)
        assert grads[gan].abs().max() > 0
    # the adversarial term does reach the generator
    assert (grads[True] - grads[False]).abs().max() > 0


def test_critic_step_gradients_reach_only_the_critic_and_head():
    models = _distill_models()
    embeds = _embeds()
    x_gen = self_forcing_rollout(models.generator, OneForcingScheduler(), _noise(), embeds, exit_step=0,
                                 rng=torch.Generator().manual_seed(0))
    assert x_gen.requires_grad  # even a graph-carrying video must not train the generator here
    grads = {}
    for gan in (False, True):
        models.critic.zero_grad(set_to_none=True)
        section = _section(r1_weight=1.0, r2_weight=1e-3)
        loss, logs = critic_loss(models, x_gen, _noise(seed=9), embeds, section, torch.Generator().manual_seed(2), gan)
        loss.backward(retain_graph=True)
        assert _all_none(models.generator) and _all_none(models.teacher)
        assert _all_none(models.discriminator) != gan
        grads[gan] = _flat_grad(models.critic)
        assert grads[gan].abs().max() > 0
        if gan:
            assert {"d_adv", "r1", "r2", "d_real", "d_fake"} <= set(logs)
    # the discriminator loss also trains the critic backbone (the shared noised-latent critic)
    assert (grads[True] - grads[False]).abs().max() > 0


def test_critic_optimizer_steps_the_head_at_its_own_learning_rate():
    """One critic step with the adversarial term: the head's parameters move by about ``gan.lr`` (Adam's first step
    is about the learning rate per parameter), the critic's by about ``lr_critic`` whatever the head's rate; without
    ``gan.lr`` both move at ``lr_critic``, and a critic without a head has one parameter group."""
    start = _distill_models()
    embeds = _embeds()
    x_gen = self_forcing_rollout(start.generator, OneForcingScheduler(), _noise(), embeds, exit_step=0,
                                 rng=torch.Generator().manual_seed(0)).detach()

    def largest_moves(section):
        models = copy.deepcopy(start)
        optimizer = critic_optimizer(section, models.critic, models.discriminator)
        assert [g["lr"] for g in optimizer.param_groups] == [section.lr_critic, section.gan.lr or section.lr_critic]
        loss, _ = critic_loss(models, x_gen, _noise(seed=9), embeds, section, torch.Generator().manual_seed(2), True)
        loss.backward()
        optimizer.step()
        return [max((after - before).abs().max().item() for after, before in zip(m.parameters(), s.parameters()))
                for m, s in ((models.critic, start.critic), (models.discriminator, start.discriminator))]

    section = _section()
    critic_move, head_move = largest_moves(section)
    assert critic_move == pytest.approx(section.lr_critic, rel=0.05)
    assert head_move == pytest.approx(section.lr_critic, rel=0.05)
    critic_move, head_move = largest_moves(_section(lr=100 * section.lr_critic))
    assert critic_move == pytest.approx(section.lr_critic, rel=0.05)
    assert head_move == pytest.approx(100 * section.lr_critic, rel=0.05)
    assert len(critic_optimizer(section, start.critic, None).param_groups) == 1
    with pytest.raises(ConfigError, match="distill.gan.lr"):
        load_config(None, ["distill.gan.lr=0"])


def test_adversarial_term_noises_at_its_own_timesteps_when_set():
    """``gan.timestep_shift`` moves the adversarial term's noise levels and nothing else: they are drawn with that
    shift after the loss's own t and noise; the DMD loss and the critic's flow loss keep their values; the head reads
    both videos at the new levels (its logits and R1 recomputed there); the shift must be positive."""
    shared, own = _section(r1_weight=1.0), _section(r1_weight=1.0, timestep_shift=0.2)
    t = loss_timesteps(shared, 256, torch.Generator().manual_seed(5), "cpu")
    assert adversarial_timesteps(shared, t, torch.Generator().manual_seed(6)) is t
    t_adv = adversarial_timesteps(own, t, torch.Generator().manual_seed(6))
    assert torch.equal(t_adv, sample_timesteps(256, shift=0.2, generator=torch.Generator().manual_seed(6)))
    assert t_adv.mean() < 0.5 * t.mean()  # shift 0.2 against the loss's 5: far less noise

    models = _distill_models()
    embeds, negative = _embeds(), torch.zeros(1, 8, 32)
    x_gen = self_forcing_rollout(models.generator, OneForcingScheduler(), _noise(), embeds, exit_step=0,
                                 rng=torch.Generator().manual_seed(0)).detach()
    logs = {}
    for name, section in (("shared", shared), ("own", own)):
        with frozen(models.critic, models.discriminator):
            _, generator_logs = generator_loss(models, x_gen, embeds, negative, section,
                                               torch.Generator().manual_seed(1), True)
        _, critic_logs = critic_loss(models, x_gen, _noise(seed=9), embeds, section, torch.Generator().manual_seed(2),
                                     True)
        logs[name] = {**generator_logs, **critic_logs}
    assert logs["own"]["dmd"] == logs["shared"]["dmd"]
    assert logs["own"]["critic_flow"] == pytest.approx(logs["shared"]["critic_flow"], rel=1e-5)

    def head_at_own_levels(video, seed):
        """(mean logit, R1) of the head on ``video`` noised as a loss drawing from ``seed`` noises it."""
        rng = torch.Generator().manual_seed(seed)
        t = loss_timesteps(own, video.shape[0], rng, "cpu")
        noise = torch.randn(video.shape, generator=rng)
        t_adv = adversarial_timesteps(own, t, rng)

        def head(x):
            return critic_logits(models.critic, models.discriminator, own.gan.feature_layers, x, t_adv, embeds)[0]

        with torch.no_grad():
            x_adv = add_noise(video, noise, t_adv)
            logits = head(x_adv)
            return logits.mean().item(), perturbation_penalty(head, x_adv, logits, own.gan.r1_sigma, rng).item()

    assert logs["own"]["d_fake_gen"] == pytest.approx(head_at_own_levels(x_gen, 1)[0], rel=1e-4)
    assert logs["own"]["d_fake"] == pytest.approx(head_at_own_levels(x_gen, 2)[0], rel=1e-4)
    d_real, r1 = head_at_own_levels(_noise(seed=9), 2)
    assert (logs["own"]["d_real"], logs["own"]["r1"]) == pytest.approx((d_real, r1), rel=1e-4)
    assert logs["own"]["d_real"] != pytest.approx(logs["shared"]["d_real"], rel=1e-3)
    with pytest.raises(ConfigError, match="distill.gan.timestep_shift"):
        load_config(None, ["distill.gan.timestep_shift=0"])
    assert load_config(None, ["distill.gan.timestep_shift=1.5"]).distill.gan.timestep_shift == 1.5


def test_discriminator_head_reads_only_its_feature_layers():
    critic = make_tiny_transformer(1)
    head = RegisterDiscriminator(dim=DIM, feature_layers=[0], num_heads=2, ffn_dim=32)
    x, t = _noise(), torch.tensor([300.0, 700.0])
    logits, flow = critic_logits(critic, head, [0], x, t, _embeds())
    assert logits.shape == (2,) and flow.shape == x.shape
    logits.sum().backward()
    # block 1 comes after the tapped block 0 and feeds only the flow output: no gradient from the logit
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in critic.blocks[1].parameters())
    assert critic.blocks[0].attn1.to_q.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="increasing"):
        RegisterDiscriminator(dim=DIM, feature_layers=[1, 0], num_heads=2)


def _optimise(params, loss_fn, steps, lr):
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.999))
    values = []
    for _ in range(steps):
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(loss.item())
    return values


def test_distill_steps_reduce_generator_and_critic_losses_on_a_fixed_batch():
    models = _distill_models()
    section, embeds, negative = _section(), _embeds(), torch.zeros(1, 8, 32)

    def generator_objective():
        x_gen = self_forcing_rollout(models.generator, OneForcingScheduler(), _noise(), embeds, exit_step=0,
                                     rng=torch.Generator().manual_seed(0))
        return generator_loss(models, x_gen, embeds, negative, section, torch.Generator().manual_seed(1), True)[0]

    with frozen(models.critic, models.discriminator):
        values = _optimise(models.generator.parameters(), generator_objective, 8, 1e-3)
    assert values[-1] < 0.8 * values[0], values
    with torch.no_grad():
        x_gen = self_forcing_rollout(models.generator, OneForcingScheduler(), _noise(), embeds, exit_step=0)
    real = _noise(seed=11)
    params = list(models.critic.parameters()) + list(models.discriminator.parameters())
    values = _optimise(params, lambda: critic_loss(models, x_gen, real, embeds, section,
                                                   torch.Generator().manual_seed(2), True)[0], 8, 1e-3)
    assert values[-1] < 0.9 * values[0], values


# -- teacher and ODE stages ---------------------------------------------------------------------------------------
def test_teacher_loss_decreases_on_a_fixed_batch():
    model = make_tiny_transformer(0).train()
    latents, embeds, noise = _noise(seed=3), _embeds(), _noise(seed=4)
    t = torch.tensor([250.0, 800.0])
    values = _optimise(model.parameters(), lambda: teacher_loss(model, latents, embeds, t, noise), 10, 2e-3)
    assert values[-1] < 0.8 * values[0], values


def test_block_causal_teacher_loss_trains_frames_as_the_causal_student_makes_them():
    """attention_mode="block_causal" (teacher.attention_mode): latent frame 0 is predicted from itself alone, as the
    frame-wise student generates it, so its loss ignores later frames; bidirectionally it does not."""
    model = make_tiny_transformer(0)
    embeds, t = _embeds(), torch.tensor([990.0, 1000.0])
    latents, noise = _noise(seed=3), _noise(seed=4)
    changed = latents.clone()
    changed[:, :, 1:] += 1.0
    first = (slice(None), slice(None), slice(0, 1))

    def frame0_loss(x0, mode):
        x_t = add_noise(x0, noise, t)
        flow = model(x_t, t, embeds, attention_mode=mode).sample
        return torch.nn.functional.mse_loss(flow[first], (noise - x0)[first])

    with torch.no_grad():
        assert torch.equal(frame0_loss(latents, "block_causal"), frame0_loss(changed, "block_causal"))
        assert not torch.equal(frame0_loss(latents, "bidirectional"), frame0_loss(changed, "bidirectional"))
        assert not torch.equal(teacher_loss(model, latents, embeds, t, noise, "block_causal"),
                               teacher_loss(model, latents, embeds, t, noise))
    with pytest.raises(ConfigError, match="teacher.attention_mode"):
        load_config(CONFIGS / "tiny_cpu.json", ["teacher.attention_mode=causal"])
    with pytest.raises(ConfigError, match="teacher.clean_context"):
        load_config(CONFIGS / "tiny_cpu.json", ["teacher.clean_context=true"])


def test_clean_context_frames_are_context_only():
    """teacher.clean_context: a clip's first k blocks at t = 0 (k uniform over 0 .. blocks - 1, cut at block
    boundaries), and the loss is on the other frames only: the noise drawn for a clean frame changes nothing."""
    layout = BlockLayout(frames_per_block=2, num_frames=5)  # blocks [2, 2, 1]
    t = torch.full((400,), 990.0)
    per_frame = clean_context_timesteps(t, layout, torch.Generator().manual_seed(0))
    clean_counts = (per_frame == 0).sum(dim=1)
    assert per_frame.shape == (400, 5) and set(per_frame.unique().tolist()) == {0.0, 990.0}
    assert set(clean_counts.tolist()) == {0, 2, 4}  # each k occurs, and a clean prefix ends at a block's end
    assert torch.equal(per_frame == 0, torch.arange(5)[None] < clean_counts[:, None])

    model = make_tiny_transformer(0)
    latents, embeds, noise = _noise(seed=3), _embeds(), _noise(seed=4)
    t = torch.tensor([[0.0, 990.0, 990.0], [0.0, 0.0, 1000.0]])
    other = noise.clone()
    other[0, :, 0] = 5.0
    other[1, :, :2] = -5.0
    with torch.no_grad():
        loss = teacher_loss(model, latents, embeds, t, noise, "block_causal")
        assert torch.equal(loss, teacher_loss(model, latents, embeds, t, other, "block_causal"))
        assert not torch.equal(loss, teacher_loss(model, latents, embeds, t.clamp(min=1.0), other, "block_causal"))


def test_ode_trajectory_and_regression():
    teacher = make_tiny_transformer(1)
    scheduler = OneForcingScheduler(denoising_timesteps=[1000, 750, 500, 250])
    keep = scheduler.block_timesteps(1).tolist()
    noise, embeds = _noise(), _embeds()
    states = teacher_trajectory(teacher, noise, embeds, torch.zeros_like(embeds), keep_timesteps=keep,
                                num_inference_steps=6, shift=8.0, guidance_scale=4.0)
    assert states.shape == (2, len(keep) + 1, *LATENT)
    assert torch.equal(states[:, 0], noise)  # t = 1000 is pure noise
    unguided = teacher_trajectory(teacher, noise, embeds, None, keep_timesteps=keep, num_inference_steps=6,
                                  shift=8.0, guidance_scale=1.0)
    assert (unguided[:, -1] - states[:, -1]).abs().max() > 1e-3
    sigmas, index = ode_sigmas(6, 8.0, [t / 1000 for t in keep])
    assert torch.allclose(sigmas[index].float() * 1000, torch.tensor(keep), atol=1e-3)

    student = make_tiny_transformer(1).train()
    choices = block_state_choices(scheduler, keep, 3, 2, torch.Generator().manual_seed(0))
    assert choices.shape == (2, 3) and choices.max() < len(keep)
    values = _optimise(student.parameters(), lambda: ode_regression_loss(student, states, keep, embeds, choices, 1),
                       10, 2e-3)
    assert values[-1] < 0.8 * values[0], values


def test_ode_regression_is_block_causal_with_one_timestep_per_block():
    student = make_tiny_transformer(1)
    states = _noise(1, shape=(3, *LATENT)).unsqueeze(0)[0]  # [1, S + 1 = 3, C, F, H, W]
    keep = [1000.0, 500.0]
    states = states.requires_grad_(True)
    loss = ode_regression_loss(student, states, keep, _embeds(1), torch.tensor([[0, 1, 0]]), 1)
    (grad,) = torch.autograd.grad(loss, states)
    # inputs: frame 0 from state 0, frame 1 from state 1, frame 2 from state 0; the endpoint is the target
    assert grad[0, 0, :, 0].abs().max() > 0 and grad[0, 0, :, 1].abs().max() == 0
    assert grad[0, 1, :, 1].abs().max() > 0 and grad[0, 1, :, 0].abs().max() == 0


# -- sampling, data order, configs --------------------------------------------------------------------------------
def test_timestep_sampling_shift_and_clamp():
    t = sample_timesteps(4000, shift=5.0, min_timestep=20.0, max_timestep=980.0,
                         generator=torch.Generator().manual_seed(0))
    assert t.min() >= 20.0 and t.max() <= 980.0
    assert (t == 980.0).float().mean() > 0.05  # shift 5 piles probability near t = 1000
    assert 0.6 < (t > 500).float().mean() < 0.9  # P(5u / (1 + 4u) > 0.5) = P(u > 1/6)


def test_batch_order_is_a_function_of_the_step_and_ranks_do_not_overlap():
    a = batch_indices(10, 2, 3, seed=1, rank=0, world_size=2)
    b = batch_indices(10, 2, 3, seed=1, rank=1, world_size=2)
    assert a == batch_indices(10, 2, 3, seed=1, rank=0, world_size=2)
    assert not set(a) & set(b)
    epoch = [i for step in range(5) for i in batch_indices(10, 2, step, seed=1)]
    assert sorted(epoch) == list(range(10))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model.architecture  # every recipe can build its models from scratch
    raw = json.loads(path.read_text())
    assert raw["output_dir"] == config.output_dir


def test_config_overrides_and_errors(tmp_path):
    config = load_config(CONFIGS / "tiny_cpu.json", ["distill.gan.enabled=false", "distill.steps=3", "seed=5"])
    assert (config.distill.gan.enabled, config.distill.steps, config.seed) == (False, 3, 5)
    with pytest.raises(ConfigError, match="distill.nope"):
        load_config(CONFIGS / "tiny_cpu.json", ["distill.nope=1"])
    with pytest.raises(ConfigError, match="distill.steps"):
        load_config(None, ["distill.steps=many"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config(bad)
