"""The DiT block (adaLN-Zero self-attention, cross-attention, MLP) and the final layer."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from soragen.core.config import DiTConfig
from soragen.layers.adaln import Modulation, adaln, gated, modulate
from soragen.layers.attention import CrossAttention, SelfAttention, TextKV


class DiTBlock(nn.Module):
    """adaLN-Zero block: c regresses shift/scale/gate for attention and MLP; zero gates at init
    make the block the identity. Cross-attention to the text sits between the two."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(config)
        if config.cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = CrossAttention(config)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # Exact (erf) GELU by default: in bf16 on a CPU it runs several times faster than tanh's.
        self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_width), nn.GELU(approximate="tanh" if config.gelu == "tanh"
                                                                            else "none"),
                                 nn.Linear(config.mlp_width, dim))
        self.adaLN_modulation = adaln(config, 6)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D), or the shared projection of c (B, 6D) -> (B, 1, 6D): shift, scale, gate for
        attention, then for the MLP."""
        return self.adaLN_modulation(c)[:, None]

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, text: TextKV | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, segments: list[int] | None = None) -> torch.Tensor:
        """x (B, N, D); modulation = self.modulation(c); text = self.cross.text_kv(...); rope = rope_angles(...);
        segments: runs of tokens at timesteps of their own (an image's frame at 0), one modulation row each."""
        attn, mlp = Modulation.split(modulation, 2)
        x = gated(x, attn.gate, self.attn(modulate(self.norm1(x), attn, segments), rope), segments)  # x + gate * attention
        if text is not None:
            x = x + self.cross(self.norm_cross(x), text)
        return gated(x, mlp.gate, self.mlp(modulate(self.norm2(x), mlp, segments)), segments)  # x + gate * MLP


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) and a linear from each token to its patch of the prediction."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, math.prod(config.patch_size) * config.predicted_channels)
        self.adaLN_modulation = adaln(config, 2)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D) -> (B, 1, 2D): shift, scale."""
        return self.adaLN_modulation(c)[:, None]

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, segments: list[int] | None = None) -> torch.Tensor:
        shift, scale = modulation.chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), Modulation(shift, scale, None), segments))
