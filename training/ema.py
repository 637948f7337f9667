"""Exponential moving average of a model's parameters (the generator's EMA is the released model)."""

from __future__ import annotations

import torch


class ExponentialMovingAverage:
    """float32 shadow copies of the trainable parameters of ``model``.

    Before ``start_step`` the shadow follows the model exactly; from then on shadow <- decay * shadow + (1 - decay) *
    parameter after each optimizer step. ``device``: where the shadow lives ("cpu" saves accelerator memory).
    """

    def __init__(self, model: torch.nn.Module, decay: float, start_step: int = 0, device=None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.shadow = {
            name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
            for name, p in model.named_parameters()
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Call after the optimizer step number ``step`` (1-based)."""
        decay = self.decay if step > self.start_step else 0.0
        for name, p in model.named_parameters():
            shadow = self.shadow[name]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state_dict))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(state_dict[name])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (in its dtype)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.device, p.dtype))
