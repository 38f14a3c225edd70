"""VideoDiT: the diffusion transformer that predicts the velocity (or the noise) of a video latent.

A latent video (B, C, T, H, W) is cut into spacetime patches of pt x ph x pw cells; each patch
becomes one token. Tokens get a 3D sin-cos position, then pass through DiT blocks conditioned by
adaLN-Zero on c = timestep embedding + pooled text, and cross-attend to the text tokens. A final
adaLN + linear maps each token back to its patch of the prediction. What the prediction is (the
velocity or the noise) is the noise schedule's `prediction_type`; the model does not know.

This file says what is computed, in plain torch. The kernels that make it fast on a CPU are
installed onto these modules from outside (`soragen.fast_paths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from soragen.config import DiTConfig


# ---- patches -------------------------------------------------------------------------------------

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


# ---- positions and timesteps ---------------------------------------------------------------------

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


class TimestepEmbedder(nn.Module):
    """Diffusion step t -> (B, D): sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sincos_1d(t.float(), self.freq_dim).to(self.mlp[0].weight.dtype))


# ---- adaLN ---------------------------------------------------------------------------------------

@dataclass
class Modulation:
    """What adaLN regresses from c for one sub-layer: x -> norm(x) * (1 + scale) + shift, and the
    gate on its residual branch. Each (B, 1, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    @staticmethod
    def split(modulation: torch.Tensor, count: int) -> list["Modulation"]:
        """(B, 1, 3 * count * D) -> `count` Modulations: shift, scale, gate, shift, scale, gate, ..."""
        parts = modulation.chunk(3 * count, dim=-1)
        return [Modulation(*parts[3 * i:3 * i + 3]) for i in range(count)]


def modulate(x: torch.Tensor, m: Modulation) -> torch.Tensor:
    return torch.addcmul(m.shift, x, 1 + m.scale)  # x * (1 + scale) + shift in one pass


# ---- attention -----------------------------------------------------------------------------------

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
    the same at every denoising step, and the padding's additive bias (B, 1, 1, L)."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None


class Attention(nn.Module):
    """What self- and cross-attention share: heads, RMS-normed queries and keys, the output projection."""

    attend = staticmethod(attention)  # soragen.fast_paths may install another kernel per module

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.qk_norm, self.scale = num_heads, qk_norm, (dim // num_heads) ** -0.5
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def scaled_query(self, q: torch.Tensor) -> torch.Tensor:
        return self.q_norm(q, gain=self.scale) if self.qk_norm else q * self.scale

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> (B, N, D), projected."""
        return self.proj(rearrange(heads, "b h n d -> b n (h d)"))


class SelfAttention(Attention):
    """Multi-head self-attention over the video tokens, with fused QKV."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__(dim, num_heads, qk_norm)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return self.output(self.attend(self.scaled_query(q), self.k_norm(k), v, None))


class CrossAttention(Attention):
    """Video tokens (queries) attend to the text tokens (keys and values, made once per text)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__(dim, num_heads, qk_norm)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)

    def text_kv(self, context: torch.Tensor, bias: torch.Tensor | None) -> TextKV:
        """context (B, L, D): the projected text tokens."""
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        return TextKV(self.k_norm(k).contiguous(), v.contiguous(), bias)  # made once per text, read every step

    def forward(self, x: torch.Tensor, text: TextKV) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        return self.output(self.attend(self.scaled_query(q), text.keys, text.values, text.bias))


# ---- the block -----------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    """adaLN-Zero block: c regresses shift/scale/gate for attention and MLP; zero gates at init
    make the block the identity. Cross-attention to the text sits between the two."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, config.num_heads, config.qk_norm)
        if config.cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = CrossAttention(dim, config.num_heads, config.qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # Exact (erf) GELU: in bf16 on a CPU it runs several times faster than DiT's tanh approximation.
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * config.mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(dim * config.mlp_ratio), dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D) -> (B, 1, 6D): shift, scale, gate for attention, then for the MLP."""
        return self.adaLN_modulation(c)[:, None]

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, text: TextKV | None) -> torch.Tensor:
        """x (B, N, D); modulation = self.modulation(c); text = self.cross.text_kv(...)."""
        attn, mlp = Modulation.split(modulation, 2)
        x = torch.addcmul(x, attn.gate, self.attn(modulate(self.norm1(x), attn)))  # x + gate * attention
        if text is not None:
            x = x + self.cross(self.norm_cross(x), text)
        return torch.addcmul(x, mlp.gate, self.mlp(modulate(self.norm2(x), mlp)))  # x + gate * MLP


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) and a linear from each token to its patch of the prediction."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, math.prod(config.patch_size) * config.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D) -> (B, 1, 2D): shift, scale."""
        return self.adaLN_modulation(c)[:, None]

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation.chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm(x), 1 + scale))


# ---- the model -----------------------------------------------------------------------------------

@dataclass
class Conditioning:
    """Everything a forward pass takes besides the noisy latent: each block's adaLN modulation
    (B, 1, 6D), the final layer's (B, 1, 2D), each block's text keys/values, and the tokens'
    positions (N, D). `VideoDiT.condition` makes it; sampling reuses its parts across steps."""

    blocks: list[torch.Tensor]
    final: torch.Tensor
    text: list[TextKV | None]
    positions: torch.Tensor | None = None


class VideoDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = nn.Linear(math.prod(config.patch_size) * config.in_channels, dim)
        self.time_embed = TimestepEmbedder(dim)
        self.text_pooled = nn.Linear(config.text_dim, dim)
        if config.cross_attention:
            self.text_tokens = nn.Linear(config.text_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final = FinalLayer(config)
        self.gradient_checkpointing = False
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        if self.final.linear.weight.is_meta:  # built to be loaded from a file: no values to set
            return

        def xavier(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(xavier)
        # Timestep MLP: small normal, as in DiT.
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block's shift/scale/gate start at zero, so each block is the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            # Cross-attention adds nothing at init either.
            if self.config.cross_attention:
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        # The output layer starts at zero: the first prediction is zero.
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    # ---- conditioning: what a forward takes besides the latent -----------------------------------

    def condition_vector(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """c = timestep embedding + projected pooled text: (B, D), what adaLN regresses from."""
        return self.time_embed(t) + self.text_pooled(pooled)

    def text_kv(self, text: torch.Tensor, text_mask: torch.Tensor) -> list[TextKV | None]:
        """text (B, L, Dt), mask (B, L) True for real tokens -> each block's cross-attention input."""
        if not self.config.cross_attention:
            return [None] * len(self.blocks)
        context = self.text_tokens(text)  # (B, L, D)
        bias = mask_bias(text_mask, context.dtype)
        return [block.cross.text_kv(context, bias) for block in self.blocks]

    def positions(self, grid: tuple[int, int, int], device, dtype) -> torch.Tensor:
        """(N, D) sin-cos positions of a token grid, cached per grid (traced under torch.compile)."""
        if torch.compiler.is_compiling():  # a dict lookup in the graph would cost a recompile per grid
            return sincos_3d(grid, self.config.hidden_size).to(device, dtype)
        key = (grid, str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_3d(grid, self.config.hidden_size).to(device, dtype)
        return self._pos_cache[key]

    def condition(self, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                  pooled: torch.Tensor) -> Conditioning:
        c = self.condition_vector(t, pooled)
        return Conditioning([block.modulation(c) for block in self.blocks], self.final.modulation(c),
                            self.text_kv(text, text_mask))

    # ---- the forward pass ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W) noisy latent; t: (B,) steps; text: (B, L, Dt) tokens with mask (B, L)
        (True = real token); pooled: (B, Dt). Returns the prediction, shaped like x."""
        return self.predict(x, self.condition(t, text, text_mask, pooled))

    def predict(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The forward pass given its conditioning: patches -> tokens -> blocks -> patches."""
        B, C, T, H, W = x.shape
        ps = self.config.patch_size
        grid = token_grid((T, H, W), ps)
        padded = tuple(g * p for g, p in zip(grid, ps))
        if padded != (T, H, W):  # a partial patch at an edge: pad with zeros, crop after
            x = F.pad(x, (0, padded[2] - W, 0, padded[1] - H, 0, padded[0] - T))
        tokens = self.patch_embed(patchify(x, ps))  # (B, N, D)
        positions = self.positions(grid, x.device, tokens.dtype) if cond.positions is None else cond.positions
        tokens = tokens + positions
        for block, modulation, text in zip(self.blocks, cond.blocks, cond.text):
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, modulation, text, use_reentrant=False)
            else:
                tokens = block(tokens, modulation, text)
        out = unpatchify(self.final(tokens, cond.final), grid, ps)  # (B, C, T', H', W')
        return out[:, :, :T, :H, :W]

    def flops_per_forward(self, num_tokens: int, text_len: int, batch: int = 1, text_kv: bool = True) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward pass: what model FLOP utilisation counts.
        text_kv=False leaves out the text's keys/values (`predict` given a made `Conditioning`)."""
        cfg, D = self.config, self.config.hidden_size
        per_block = 2 * num_tokens * D * 3 * D + 2 * num_tokens * D * D  # qkv + out proj
        per_block += 2 * 2 * num_tokens * num_tokens * D  # q @ k and attn @ v
        per_block += 2 * 2 * num_tokens * D * int(D * cfg.mlp_ratio)  # MLP
        if cfg.cross_attention:
            per_block += 2 * num_tokens * D * D * 2 + (2 * text_len * D * 2 * D if text_kv else 0)  # q, out; kv
            per_block += 2 * 2 * num_tokens * text_len * D
        patch_dim = math.prod(cfg.patch_size) * cfg.in_channels
        total = cfg.depth * per_block + 2 * 2 * num_tokens * patch_dim * D  # + embed and final
        return batch * total
