"""Timesteps and the few-step flow-matching update of One-Forcing / Self-Forcing.

The model is trained on a flow grid of ``num_train_timesteps`` points: sigma_i = linspace(1, 0, N + 1)[:-1], shifted
as shift * s / (1 + (shift - 1) * s), timestep = 1000 * sigma. A short denoising list such as [1000, 750, 500, 250]
is *warped* onto that grid (entry d becomes grid[1000 - d], with 0 appended at the end of the grid), which with
shift 5 gives [1000, 937.5, 833.33, 625]. The model predicts the flow v = noise - x0; with sigma = t / 1000:
x0 = x_t - sigma * v, and the next step's input is (1 - sigma') x0 + sigma' * fresh_noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class OneForcingSchedulerOutput(BaseOutput):
    """``prev_sample``: the next step's input (or x0 after the last step). ``pred_original_sample``: x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class OneForcingScheduler(SchedulerMixin, ConfigMixin):
    """Few-step flow-matching schedule of causal rollouts (shift-5 grid, warped timestep lists).

    Args:
        num_train_timesteps: points of the training grid (1000).
        shift: flow shift of the grid (5.0).
        denoising_timesteps: per-block timestep list, e.g. [1000] (one step) or [1000, 750, 500, 250].
        first_block_timesteps: list for the first block only (e.g. four steps before one-step blocks); None = same.
        warp_timesteps: map the lists onto the shifted grid (what the released models were trained with).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 5.0,
        denoising_timesteps: list[float] = (1000,),
        first_block_timesteps: list[float] | None = None,
        warp_timesteps: bool = True,
    ):
        if num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be positive")
        if shift <= 0:
            raise ValueError("shift must be positive")
        sigmas = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.grid_timesteps = (sigmas * 1000.0).float()  # [N], 1000 -> ~5 for shift 5
        self.timesteps = self.block_timesteps(0)

    def warp(self, timesteps) -> torch.Tensor:
        """Map a list of timesteps (each in (0, num_train_timesteps]) onto the shifted training grid."""
        t = self._as_numbers(timesteps)
        n = self.config.num_train_timesteps
        if t.numel() == 0:
            raise ValueError("a timestep list needs at least one entry")
        if (t <= 0).any() or (t > n).any():
            raise ValueError(f"timesteps must lie in (0, {n}], got {t.tolist()}")
        index = (n - t).round().long()
        if (index[1:] <= index[:-1]).any():
            raise ValueError(f"timesteps must decrease by at least one step of the {n}-step grid, got {t.tolist()}")
        grid = torch.cat([self.grid_timesteps.double(), torch.zeros(1, dtype=torch.float64)])
        return grid[index].float()

    @staticmethod
    def _as_numbers(timesteps) -> torch.Tensor:
        """A timestep list -> float64 [S]; anything but a list of finite real numbers is a ``ValueError``."""
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.tolist() if timesteps.ndim == 1 else [timesteps]
        if isinstance(timesteps, (str, bytes)) or not hasattr(timesteps, "__iter__"):
            raise ValueError(f"timesteps must be a list of numbers, got {timesteps!r}")
        values = list(timesteps)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"timesteps must be finite numbers, got {values!r}")
        return torch.tensor(values, dtype=torch.float64)

    def prepare_timesteps(self, timesteps) -> torch.Tensor:
        """A user timestep list as the model sees it (warped when the config says so), float32 [S]."""
        if self.config.warp_timesteps:
            out = self.warp(timesteps)
        else:
            out = self._as_numbers(timesteps).float()
            if out.numel() == 0 or (out <= 0).any() or (out > self.config.num_train_timesteps).any():
                raise ValueError(f"timesteps must be a non-empty list in (0, 1000], got {out.tolist()}")
        if (out[1:] >= out[:-1]).any():
            raise ValueError(f"timesteps must decrease, got {out.tolist()}")
        return out

    def block_timesteps(
        self, block_index: int, denoising_timesteps=None, first_block_timesteps=None
    ) -> torch.Tensor:
        """The timesteps of block ``block_index``; arguments override the config's lists."""
        steps = denoising_timesteps if denoising_timesteps is not None else self.config.denoising_timesteps
        first = first_block_timesteps if first_block_timesteps is not None else self.config.first_block_timesteps
        if block_index == 0 and first is not None:
            steps = first
        return self.prepare_timesteps(steps)

    def set_timesteps(self, denoising_timesteps=None, device=None, first_block_timesteps=None) -> None:
        """diffusers-style: sets ``self.timesteps`` to the (warped) per-block list."""
        if denoising_timesteps is not None or first_block_timesteps is not None:
            self.register_to_config(
                denoising_timesteps=list(denoising_timesteps or self.config.denoising_timesteps),
                first_block_timesteps=(
                    list(first_block_timesteps) if first_block_timesteps is not None
                    else self.config.first_block_timesteps
                ),
            )
        self.timesteps = self.block_timesteps(1).to(device) if device else self.block_timesteps(1)

    @staticmethod
    def sigma(timestep: torch.Tensor | float) -> torch.Tensor | float:
        return timestep / 1000.0

    def x0_from_flow(self, sample: torch.Tensor, flow: torch.Tensor, timestep) -> torch.Tensor:
        """x0 = x_t - sigma * v, computed in float32 and returned in ``sample``'s dtype."""
        sigma = self._sigma_like(timestep, sample)
        return (sample.float() - sigma * flow.float()).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma * noise (float32 math, ``original_samples``' dtype)."""
        sigma = self._sigma_like(timestep, original_samples)
        return ((1 - sigma) * original_samples.float() + sigma * noise.float()).to(original_samples.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        next_timestep=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> OneForcingSchedulerOutput | tuple:
        """x0 from the flow; if ``next_timestep`` is given, re-noise x0 to it with fresh noise.

        The fresh noise is ``noise`` if given, else drawn from ``generator`` (on its device) in ``sample``'s shape.
        """
        x0 = self.x0_from_flow(sample, model_output, timestep)
        if next_timestep is None:
            prev = x0
        else:
            if noise is None:
                noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
            prev = self.add_noise(x0, noise, next_timestep)
        if not return_dict:
            return prev, x0
        return OneForcingSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    @staticmethod
    def _sigma_like(timestep, like: torch.Tensor):
        """sigma broadcast over [B, C, F, H, W]: a scalar, [B] or [B, F] timestep."""
        if isinstance(timestep, (int, float)) or (
            isinstance(timestep, torch.Tensor) and timestep.ndim == 0 and timestep.device.type == "cpu"
        ):
            # a 0-d CPU tensor joins GPU arithmetic as a scalar: no host-to-device copy, which would synchronise
            # the host with the GPU on every denoising step
            return torch.as_tensor(timestep, dtype=torch.float32) / 1000.0
        t = torch.as_tensor(timestep, dtype=torch.float32, device=like.device)
        if t.ndim == 1:
            t = t[:, None, None, None, None]
        elif t.ndim == 2:
            t = t[:, None, :, None, None]
        return t / 1000.0

    def __len__(self) -> int:
        return self.config.num_train_timesteps
