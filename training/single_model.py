"""The loop of the one-model stages (teacher, ode-init): loss, backward, clip, AdamW step, EMA, log, checkpoint."""

from __future__ import annotations

from typing import Callable

import torch

from .config import OptimConfig
from .ema import ExponentialMovingAverage
from .flow import step_generator
from .runner import StageRun, clip_and_step, make_optimizer

LossFn = Callable[[torch.nn.Module, int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
"""(prepared model, step, the step's generator) -> (loss, extra numbers to log)."""


def train_single_model(run: StageRun, model: torch.nn.Module, name: str, optim: OptimConfig, loss_fn: LossFn) -> dict:
    """Train ``model`` for ``optim.steps`` steps (resuming from the stage's latest checkpoint unless told otherwise).

    Writes checkpoints every ``optim.save_every`` steps and at the end, and ``final/<name>`` (plus
    ``final/<name>_ema`` with EMA). Returns the stage summary.
    """
    config = run.config
    ema = ExponentialMovingAverage(model, optim.ema_decay, optim.ema_start_step) if optim.ema_decay > 0 else None
    emas = {f"{name}_ema": ema} if ema else {}
    optimizer = make_optimizer(model.parameters(), optim.lr, optim.betas, optim.weight_decay)
    checkpoint = run.resume_from()
    if checkpoint is not None:
        run.load_model_states(checkpoint, {name: model}, emas)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    start = run.load_training_state(checkpoint, {name: optimizer}) if checkpoint is not None else 0

    def save(step: int) -> None:
        run.save_checkpoint(step, {name: model}, {name: optimizer}, {k: (e, model) for k, e in emas.items()})

    last, saved = start, False
    for step in range(start + 1, optim.steps + 1):
        generator = step_generator(config.seed, step, 0, run.rank, run.device)
        with run.autocast():
            loss, extra = loss_fn(model, step, generator)
        run.accelerator.backward(loss)
        grad_norm = clip_and_step(run, model.parameters(), optimizer, optim.max_grad_norm)
        if ema is not None:
            ema.update(run.unwrap(model), step)
        run.log(step, {"loss": loss.item(), "grad_norm": grad_norm, **extra})
        last = step
        saved = bool(optim.save_every) and step % optim.save_every == 0 and step < optim.steps
        if saved:
            save(step)
        if step < optim.steps and run.out_of_time(optim.max_seconds):
            run.print(f"[{run.stage}] stopping at step {step} of {optim.steps}: max_seconds={optim.max_seconds} spent")
            break
    if last > start and not saved:
        save(last)
    run.check_replicas({name: model})
    final_models = {name: model, **{k: model for k in emas}}
    run.save_final(final_models, {k: e.state_dict() for k, e in emas.items()})
    return run.finish({"steps": last, "planned_steps": optim.steps, "final": str(run.dir / "final" / name)})
