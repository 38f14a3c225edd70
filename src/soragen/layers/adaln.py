"""adaLN: the timestep (and pooled text) modulating each sub-layer's norm and gating its residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from soragen.core.config import DiTConfig


@dataclass
class Modulation:
    """What adaLN regresses from c for one sub-layer: x -> norm(x) * (1 + scale) + shift, and the
    gate on its residual branch. Each (B, 1, D); or (B, S, D) for S runs of tokens at timesteps of
    their own (`segments`: how many tokens each run holds, in token order)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    @staticmethod
    def split(modulation: torch.Tensor, count: int) -> list["Modulation"]:
        """(B, 1, 3 * count * D) -> `count` Modulations: shift, scale, gate, shift, scale, gate, ..."""
        parts = modulation.chunk(3 * count, dim=-1)
        return [Modulation(*parts[3 * i:3 * i + 3]) for i in range(count)]


def modulate(x: torch.Tensor, m: Modulation, segments: list[int] | None = None) -> torch.Tensor:
    """x * (1 + scale) + shift in one pass, in the modulation's dtype (float32 where it is kept so),
    returned in x's; with `segments`, each run of tokens by its own row of the modulation."""
    if segments is None:
        return torch.addcmul(m.shift, x, 1 + m.scale).to(x.dtype)
    return torch.cat([torch.addcmul(m.shift[:, i:i + 1], part, 1 + m.scale[:, i:i + 1])
                      for i, part in enumerate(x.split(segments, dim=1))], dim=1).to(x.dtype)


def gated(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor, segments: list[int] | None = None) -> torch.Tensor:
    """x + gate * branch: a residual branch scaled by its adaLN gate, returned in x's dtype."""
    if segments is None:
        return torch.addcmul(x, gate, branch).to(x.dtype)
    return torch.cat([torch.addcmul(part, gate[:, i:i + 1], run) for i, (part, run) in
                      enumerate(zip(x.split(segments, dim=1), branch.split(segments, dim=1)))], dim=1).to(x.dtype)


def adaln(config: DiTConfig, count: int) -> nn.Module:
    """Where a layer's `count` x (shift, scale, gate) come from: a linear of c (adaLN-Zero, per
    block), or a learned table added to the model's shared projection of c."""
    dim = config.hidden_size
    if config.modulation == "per_block":
        return nn.Sequential(nn.SiLU(), nn.Linear(dim, count * dim))
    return SharedModulation(count, dim)


class SharedModulation(nn.Module):
    """Wan's adaLN: table (1, count, D) + the shared projection of c, (B, count * D)."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1, count, dim))

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        """shared (B, count * D): the block's part of the model's projection; or (B, D): c itself,
        added to every row of the table (the final layer's)."""
        return (self.table + shared.unflatten(1, (-1, self.table.shape[2]))).flatten(1)
