"""Where a token is and when a step is: sin-cos features, the timestep embedder, 3D RoPE."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) sin-cos features with periods from 1 to 10000."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """(t*h*w, dim) position features for a token grid of any size, computed on the fly.
    Each axis gets an even third of `dim`; what is left over stays zero."""
    axis_dim = (dim // 3) // 2 * 2
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)  # (N, 3) in the same raster order as patchify
    parts = [sincos_1d(coords[:, i], axis_dim) for i in range(3)]
    pad = torch.zeros(coords.shape[0], dim - 3 * axis_dim, dtype=torch.float64)
    return torch.cat(parts + [pad], dim=1).float()


def timestep_features(t: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """(B,) steps -> (B, dim) sinusoidal features: [sin, cos] computed in float64 (ours), or
    [cos, sin] in float32 (diffusers' Timesteps with flip_sin_to_cos, as Wan was trained)."""
    if kind == "sin_cos_float64":
        return sincos_1d(t.float(), dim)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimestepEmbedder(nn.Module):
    """Diffusion step t -> (B, D): sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, features: str = "sin_cos_float64"):
        super().__init__()
        self.freq_dim, self.features = freq_dim, features
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim, self.features).to(self.mlp[0].weight.dtype))


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """3D rotary positions of a token grid: (cos, sin), each (N, head_dim / 2), for the pairs
    (x[2i], x[2i+1]) of a head. Wan's split of the head: height and width 2 * (head_dim // 6) each,
    time the rest; each axis's frequencies run from 1 to 1/theta."""
    hw = 2 * (head_dim // 6)
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    coords = coords.reshape(-1, 3).to(torch.float64)  # (N, 3), the raster order of patchify
    angles = []
    for axis, dim in enumerate((head_dim - 2 * hw, hw, hw)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(coords[:, axis:axis + 1] * freqs[None])
    angles = torch.cat(angles, dim=1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (B, heads, N, d) by its position's angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)
