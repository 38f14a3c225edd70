"""Attention: heads, RMS-normed queries and keys, self-attention over the video tokens and
cross-attention to the text."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from soragen.core.config import DiTConfig
from soragen.layers.positions import apply_rope


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) True for keys to attend to -> (B, 1, 1, L) additive bias: 0 there, -inf elsewhere,
    broadcast over heads and queries."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask.bool(), float("-inf"))
    return bias[:, None, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T + bias) v over (B, heads, N, d) tensors, q already scaled by 1/sqrt(d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=1.0)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, returned in the input's dtype. Written out
    in four ops rather than F.rms_norm, whose CPU kernel copies strided bf16 views first."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """`gain` multiplies the result for free (attention folds its 1/sqrt(d) in here)."""
        xf = x.float()
        weight = self.weight.float() * gain if gain != 1.0 else self.weight.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight).to(x.dtype)


@dataclass
class TextKV:
    """The text as one block's cross-attention sees it: keys (normed) and values (B, heads, L, d),
    the same at every denoising step, and the padding's additive bias (B, 1, 1, L). An image-to-video
    model's image tokens come along as keys and values of their own (B, heads, M, d)."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    image_keys: torch.Tensor | None = None
    image_values: torch.Tensor | None = None


class Attention(nn.Module):
    """What self- and cross-attention share: heads, RMS-normed queries and keys (per head, or across
    all heads), the 1/sqrt(d) scale folded into the query's norm, the output projection."""

    attend = staticmethod(attention)  # soragen.models.fast_paths may install another kernel per module

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, self.num_heads = config.hidden_size, config.num_heads
        self.qk_norm, self.across_heads = config.qk_norm, config.qk_norm_across_heads
        self.scale = (dim // self.num_heads) ** -0.5
        norm_dim = dim if self.across_heads else dim // self.num_heads
        self.q_norm = RMSNorm(norm_dim) if self.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(norm_dim) if self.qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, heads, N, d), a view."""
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def query_heads(self, q: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> normed, scaled (B, heads, N, d)."""
        if not self.qk_norm:
            return self.heads(q) * self.scale
        return self.heads(self.q_norm(q, gain=self.scale)) if self.across_heads else self.q_norm(self.heads(q), self.scale)

    def key_heads(self, k: torch.Tensor) -> torch.Tensor:
        return self.heads(self.k_norm(k)) if self.across_heads else self.k_norm(self.heads(k))

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> (B, N, D), projected."""
        return self.proj(rearrange(heads, "b h n d -> b n (h d)"))


class SelfAttention(Attention):
    """Multi-head self-attention over the video tokens, with fused QKV; 3D RoPE on q and k if given."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, D) each
        q, k = self.query_heads(q), self.key_heads(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.output(self.attend(q, k, self.heads(v), None))


class CrossAttention(Attention):
    """Video tokens (queries) attend to the text tokens (keys and values, made once per text). With
    `image_dim` (Wan's image-to-video) the same queries attend to an image's tokens too, through
    keys and values of their own (and a norm of their own on the keys); the two results are added."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        dim = config.hidden_size
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        if config.image_dim:
            self.image_kv = nn.Linear(dim, 2 * dim)
            self.image_k_norm = RMSNorm(dim if self.across_heads else dim // self.num_heads) if self.qk_norm \
                else nn.Identity()

    def text_kv(self, context: torch.Tensor, bias: torch.Tensor | None, image: torch.Tensor | None = None) -> TextKV:
        """context (B, L, D): the projected text tokens; image (B, M, D): the projected image tokens."""
        k, v = self.kv(context).chunk(2, dim=-1)
        # made once per text, read at every step: contiguous
        kv = TextKV(self.key_heads(k).contiguous(), self.heads(v).contiguous(), bias)
        if image is not None:
            k, v = self.image_kv(image).chunk(2, dim=-1)
            k = self.heads(self.image_k_norm(k)) if self.across_heads else self.image_k_norm(self.heads(k))
            kv.image_keys, kv.image_values = k.contiguous(), self.heads(v).contiguous()
        return kv

    def forward(self, x: torch.Tensor, text: TextKV) -> torch.Tensor:
        q = self.query_heads(self.q(x))
        out = self.attend(q, text.keys, text.values, text.bias)
        if text.image_keys is not None:
            out = out + self.attend(q, text.image_keys, text.image_values, None)
        return self.output(out)
