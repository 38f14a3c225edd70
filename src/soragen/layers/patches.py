"""Spacetime patches: a latent video cut into tokens and put back."""

from __future__ import annotations

import math

import torch
from einops import rearrange


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, pt*ph*pw*C), tokens in (t, h, w) raster order."""
    pt, ph, pw = patch_size
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) -> (B, C, T, H, W); the inverse of `patchify` for a (t, h, w) token grid."""
    pt, ph, pw = patch_size
    t, h, w = grid
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                     t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def token_grid(latent_shape: tuple[int, int, int], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tokens along (t, h, w) for a latent of (T, H, W) cells; a partial patch at the end counts."""
    return tuple(math.ceil(n / p) for n, p in zip(latent_shape, patch_size))
