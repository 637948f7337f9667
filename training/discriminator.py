"""The One-Forcing discriminator head: register tokens reading the critic's hidden states.

The critic (the "fake score", a bidirectional Wan transformer) runs its normal forward on a noised video and returns
its hidden states after the chosen blocks. For each chosen block one learnable register token cross-attends to that
block's video tokens (query = the token, keys/values = the layer-normed video tokens), followed by a feed-forward
layer, both residual. The register outputs are concatenated and mapped to one logit by
LayerNorm -> Linear -> SiLU -> Linear. The critic backbone and this head are trained together by the discriminator
loss ("shared noised-latent adversarial critic").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class RegisterReadout(nn.Module):
    """One register token [dim] cross-attending to video tokens [B, L, dim] -> [B, dim]."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.token = nn.Parameter(torch.randn(dim) * 0.02)
        self.norm_tokens = nn.LayerNorm(dim, eps=eps)
        self.norm_query = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, dim = hidden_states.shape
        heads = self.num_heads
        query = self.token.to(hidden_states.dtype).expand(batch, 1, dim)
        tokens = self.norm_tokens(hidden_states)
        q = self.to_q(self.norm_query(query)).view(batch, 1, heads, -1).transpose(1, 2)
        k = self.to_k(tokens).view(batch, length, heads, -1).transpose(1, 2)
        v = self.to_v(tokens).view(batch, length, heads, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, dim)
        x = query + self.to_out(attended)
        x = x + self.ffn(self.norm_ffn(x))
        return x[:, 0]


class RegisterDiscriminator(ModelMixin, ConfigMixin):
    """Logits [B] from the critic's hidden states after ``feature_layers`` (one register token per layer).

    Args:
        dim: the critic's width (1536 for Wan2.1-1.3B).
        feature_layers: critic block indices whose output the head reads, e.g. [21, 29] (frame-wise) or [29].
        num_heads, ffn_dim: geometry of each register's cross-attention block.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 1536,
        feature_layers: Sequence[int] = (21, 29),
        num_heads: int = 12,
        ffn_dim: int = 2048,
        num_classes: int = 1,
        eps: float = 1e-6,
    ):
        super().__init__()
        if not feature_layers or list(feature_layers) != sorted(set(feature_layers)):
            raise ValueError(f"feature_layers must be increasing block indices, got {list(feature_layers)}")
        self.readouts = nn.ModuleList(RegisterReadout(dim, num_heads, ffn_dim, eps) for _ in feature_layers)
        width = dim * len(feature_layers)
        self.head = nn.Sequential(
            nn.LayerNorm(width, eps=eps), nn.Linear(width, dim), nn.SiLU(), nn.Linear(dim, num_classes)
        )

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.config.feature_layers)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """``hidden_states``: [B, L, dim] per feature layer, in ``feature_layers`` order -> logits [B] (or [B, K])."""
        if len(hidden_states) != len(self.readouts):
            raise ValueError(f"expected {len(self.readouts)} hidden states (layers {self.feature_layers}), "
                             f"got {len(hidden_states)}")
        features = torch.cat([readout(h) for readout, h in zip(self.readouts, hidden_states)], dim=-1)
        # float32 logits even under autocast: the R1/R2 penalties take differences of nearby logits
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits = self.head(features.float())
        return logits[:, 0] if logits.shape[-1] == 1 else logits


def critic_logits(critic, discriminator, feature_layers, x_t, timesteps, prompt_embeds):
    """Run the critic keeping the hidden states after ``feature_layers``: (logits [B], flow [B, C, F, H, W])."""
    out = critic(x_t, timesteps, prompt_embeds, attention_mode="bidirectional", hidden_states_at=tuple(feature_layers))
    return discriminator(out.hidden_states), out.sample
