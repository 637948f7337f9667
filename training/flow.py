"""Flow-matching pieces of the training recipe: timestep sampling, the models' x0 predictions, guidance, ODE grids.

Conventions (as the inference code): x_t = (1 - s) x0 + s * noise with s = t / 1000, the model predicts the flow
v = noise - x0, so x0 = x_t - s * v. Latents are [B, C, F, H, W].
"""

from __future__ import annotations

import torch

from ..pipelines.scheduling_one_forcing import OneForcingScheduler

_FLOW = OneForcingScheduler()  # its add_noise / x0_from_flow are the one implementation of the flow algebra


def step_generator(seed: int, step: int, stream: int, rank: int = 0, device="cpu") -> torch.Generator:
    """A generator determined by (seed, step, stream, rank): a run's randomness needs no saved state to resume."""
    value = ((seed * 1_000_003 + step) * 1_009 + stream) * 10_007 + rank
    return torch.Generator(device=device).manual_seed(value % (2**63))


def sample_timesteps(
    batch_size: int,
    *,
    shift: float = 5.0,
    min_timestep: float = 20.0,
    max_timestep: float = 980.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """[B] float timesteps: an integer u*1000 drawn uniformly from [0, 1000), shifted as 1000 * shift*u / (1 +
    (shift - 1) u), clamped to [min_timestep, max_timestep] (the DMD/critic sampling of the reference recipe)."""
    u = torch.randint(0, 1000, (batch_size,), generator=generator, device=generator.device if generator else device)
    u = u.double() / 1000.0
    t = 1000.0 * shift * u / (1.0 + (shift - 1.0) * u)
    return t.clamp(min_timestep, max_timestep).float().to(device)


def randn(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device and moved to ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample [B] or per-frame [B, F] timesteps (float32 math, ``x0``'s dtype)."""
    return _FLOW.add_noise(x0, noise, timesteps)


def predict_x0(model, x_t: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, **kwargs):
    """A bidirectional (unless ``attention_mode`` says otherwise) x0 prediction: (x0 [B, C, F, H, W] float32,
    forward output). ``timesteps``: [B] or [B, F]."""
    kwargs.setdefault("attention_mode", "bidirectional")
    out = model(x_t, timesteps, prompt_embeds, **kwargs)
    return _FLOW.x0_from_flow(x_t.float(), out.sample.float(), timesteps), out


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in the standard form uncond + scale * (cond - uncond).

    The reference DMD real score ``cond + g * (cond - uncond)`` is ``guided(cond, uncond, g + 1)``.
    """
    return uncond + scale * (cond - uncond)


def ode_sigmas(num_steps: int, shift: float, keep: list[float]) -> tuple[torch.Tensor, list[int]]:
    """Noise levels of an Euler ODE solve from 1 to 0 and where the ``keep`` levels are in it.

    The grid is ``num_steps`` steps of the shift-``shift`` flow schedule with the ``keep`` levels inserted (so the
    states there are exact, not interpolated). Returns (sigmas [N + 1] float64 from 1.0 down to 0.0, the index of each
    ``keep`` level in it).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    grid = shift * s / (1.0 + (shift - 1.0) * s)
    wanted = torch.tensor([float(k) for k in keep], dtype=torch.float64)
    if ((wanted <= 0) | (wanted > 1)).any():
        raise ValueError(f"levels to keep must be in (0, 1], got {keep}")
    merged = torch.cat([grid, wanted])
    merged = torch.unique(merged.round(decimals=9), sorted=True).flip(0)
    index = [int((merged - w).abs().argmin()) for w in wanted]
    return merged, index
