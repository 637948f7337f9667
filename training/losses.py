"""The losses of the recipe, as plain functions of tensors (the models are run by the stages).

All video tensors are [B, C, F, H, W].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def flow_matching_loss(flow_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor,
                       frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the predicted flow and the target noise - x0 (teacher and critic training), over the frames of
    ``frame_mask`` [B, F] (bool) if given, else over all."""
    if frame_mask is None:
        return F.mse_loss(flow_pred.float(), noise.float() - x0.float())
    error = (flow_pred.float() - (noise.float() - x0.float())).square()
    weight = frame_mask[:, None, :, None, None].to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum()


def x0_regression_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """MSE between predicted and target clean latents (ODE initialisation)."""
    return F.mse_loss(x0_pred.float(), x0_target.float())


def dmd_loss(
    x_gen: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distribution-matching loss whose gradient w.r.t. ``x_gen`` is (x0_fake - x0_real) / (normaliser * numel).

    The normaliser is mean |x_gen - x0_real| per sample (over C, F, H, W). The loss is 0.5 * MSE(x_gen,
    stopgrad(x_gen - grad)), in float64; ``x0_fake`` / ``x0_real`` carry no gradient.
    """
    with torch.no_grad():
        real = x0_real.double()
        normaliser = (x_gen.detach().double() - real).abs().mean(dim=tuple(range(1, x_gen.ndim)), keepdim=True)
        grad = torch.nan_to_num((x0_fake.double() - real) / normaliser.clamp_min(eps))
        target = x_gen.detach().double() - grad
    loss = 0.5 * F.mse_loss(x_gen.double(), target)
    return loss, {"dmd_grad_norm": grad.norm().item() / max(grad.shape[0], 1) ** 0.5}


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss, mean softplus(-D(fake))."""
    return F.softplus(-logits_fake.float()).mean()


def discriminator_adversarial_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def perturbation_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    logits_x: torch.Tensor,
    sigma: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Finite-difference gradient penalty mean (D(x + sigma * n) - D(x))^2, n ~ N(0, I) (not divided by sigma)."""
    n = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
    perturbed = discriminator(x + sigma * n.to(x.device, x.dtype))
    return (perturbed.float() - logits_x.float()).pow(2).mean()
