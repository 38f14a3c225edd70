"""VideoDiT: the diffusion transformer that predicts the velocity (or the noise) of a video latent.

A latent video (B, C, T, H, W) is cut into spacetime patches of pt x ph x pw cells; each patch
becomes one token. Tokens get a 3D sin-cos position, then pass through DiT blocks conditioned by
adaLN-Zero on c = timestep embedding + pooled text, and cross-attend to the text tokens. A final
adaLN + linear maps each token back to its patch of the prediction. What the prediction is (the
velocity, the noise, or a flow) is the noise schedule's `prediction_type`; the model does not know.

Wan 2.1 is the same model with other switches (DiTConfig): 3D RoPE on q and k instead of added
positions, one shared projection of the timestep plus a table per block instead of a linear per
block, q/k normed across heads, an MLP projecting the text, tanh GELU, no pooled text.

This file says what is computed, in plain torch. The kernels that make it fast on a CPU are
installed onto these modules from outside (`soragen.models.fast_paths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from soragen.core.config import DiTConfig


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
    """x * (1 + scale) + shift in one pass, in the modulation's dtype (float32 where it is kept so),
    returned in x's."""
    return torch.addcmul(m.shift, x, 1 + m.scale).to(x.dtype)


def gated(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + gate * branch: a residual branch scaled by its adaLN gate, returned in x's dtype."""
    return torch.addcmul(x, gate, branch).to(x.dtype)


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
    """Video tokens (queries) attend to the text tokens (keys and values, made once per text)."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        self.q, self.kv = nn.Linear(config.hidden_size, config.hidden_size), nn.Linear(config.hidden_size,
                                                                                        2 * config.hidden_size)

    def text_kv(self, context: torch.Tensor, bias: torch.Tensor | None) -> TextKV:
        """context (B, L, D): the projected text tokens."""
        k, v = self.kv(context).chunk(2, dim=-1)
        # made once per text, read at every step: contiguous
        return TextKV(self.key_heads(k).contiguous(), self.heads(v).contiguous(), bias)

    def forward(self, x: torch.Tensor, text: TextKV) -> torch.Tensor:
        return self.output(self.attend(self.query_heads(self.q(x)), text.keys, text.values, text.bias))


# ---- the block -----------------------------------------------------------------------------------

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
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, D); modulation = self.modulation(c); text = self.cross.text_kv(...); rope = rope_angles(...)."""
        attn, mlp = Modulation.split(modulation, 2)
        x = gated(x, attn.gate, self.attn(modulate(self.norm1(x), attn), rope))  # x + gate * attention
        if text is not None:
            x = x + self.cross(self.norm_cross(x), text)
        return gated(x, mlp.gate, self.mlp(modulate(self.norm2(x), mlp)))  # x + gate * MLP


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) and a linear from each token to its patch of the prediction."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, math.prod(config.patch_size) * config.in_channels)
        self.adaLN_modulation = adaln(config, 2)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D) -> (B, 1, 2D): shift, scale."""
        return self.adaLN_modulation(c)[:, None]

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation.chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), Modulation(shift, scale, None)))


# ---- the model -----------------------------------------------------------------------------------

@dataclass
class Conditioning:
    """Everything a forward pass takes besides the noisy latent: each block's adaLN modulation
    (B, 1, 6D), the final layer's (B, 1, 2D), each block's text keys/values, and the tokens'
    positions: (N, D) sin-cos features, or RoPE's (cos, sin). `VideoDiT.condition` makes it;
    sampling reuses its parts across steps."""

    blocks: list[torch.Tensor]
    final: torch.Tensor
    text: list[TextKV | None]
    positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None


class VideoDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = nn.Linear(math.prod(config.patch_size) * config.in_channels, dim)
        self.time_embed = TimestepEmbedder(dim, features=config.timestep_features)
        if config.pooled_text:
            self.text_pooled = nn.Linear(config.text_dim, dim)
        if config.modulation == "shared":  # one projection of c for every block's shift/scale/gate
            self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if config.cross_attention:
            self.text_tokens = (nn.Linear(config.text_dim, dim) if config.text_projection == "linear" else
                                nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                              nn.Linear(dim, dim)))
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
        for block in [*self.blocks, self.final]:
            for p in block.adaLN_modulation.parameters():
                nn.init.zeros_(p)
        for block in self.blocks:
            # Cross-attention adds nothing at init either.
            if self.config.cross_attention:
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        # The output layer starts at zero: the first prediction is zero.
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def cast(self, device, dtype: torch.dtype) -> "VideoDiT":
        """Move and cast, except that with `fp32_modulation` (Wan) what makes adaLN's modulation stays
        float32 (the timestep embedding, its shared projection, the tables): modulate() and gated()
        then compute in float32 and hand the tokens back in `dtype`. Works on the meta device too."""
        keep = set()
        if self.config.fp32_modulation:
            parts = [self.time_embed, getattr(self, "time_proj", None), self.final.adaLN_modulation]
            keep = {id(p) for part in parts + [b.adaLN_modulation for b in self.blocks] if part is not None
                    for p in part.parameters()}
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(device, torch.float32 if id(p) in keep else dtype)
        self._pos_cache.clear()
        return self

    # ---- conditioning: what a forward takes besides the latent -----------------------------------

    def condition_vector(self, t: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """c = timestep embedding (+ projected pooled text): (B, D), what adaLN regresses from."""
        c = self.time_embed(t)
        return c + self.text_pooled(pooled) if self.config.pooled_text else c

    def block_modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Every block's (B, 1, 6D) shift/scale/gate of c."""
        blocks_input = self.time_proj(c) if self.config.modulation == "shared" else c
        return [block.modulation(blocks_input) for block in self.blocks]

    def text_kv(self, text: torch.Tensor, text_mask: torch.Tensor) -> list[TextKV | None]:
        """text (B, L, Dt), mask (B, L) True for real tokens -> each block's cross-attention input."""
        if not self.config.cross_attention:
            return [None] * len(self.blocks)
        context = self.text_tokens(text)  # (B, L, D)
        bias = mask_bias(text_mask, context.dtype) if self.config.text_mask else None
        return [block.cross.text_kv(context, bias) for block in self.blocks]

    def positions(self, grid: tuple[int, int, int], device, dtype):
        """The positions of a token grid: (N, D) sin-cos features to add, or RoPE's (cos, sin)
        (float32), cached per grid (made in the graph under torch.compile)."""
        if torch.compiler.is_compiling():  # a dict lookup in the graph would cost a recompile per grid
            return self._make_positions(grid, device, dtype)
        key = (grid, str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = self._make_positions(grid, device, dtype)
        return self._pos_cache[key]

    def _make_positions(self, grid, device, dtype):
        cfg = self.config
        if cfg.positions == "rope":
            return tuple(a.to(device) for a in rope_angles(grid, cfg.hidden_size // cfg.num_heads, cfg.rope_theta))
        return sincos_3d(grid, cfg.hidden_size).to(device, dtype)

    def condition(self, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                  pooled: torch.Tensor) -> Conditioning:
        c = self.condition_vector(t, pooled)
        return Conditioning(self.block_modulations(c), self.final.modulation(c), self.text_kv(text, text_mask))

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
        rope = positions if self.config.positions == "rope" else None
        if rope is None:
            tokens = tokens + positions
        for block, modulation, text in zip(self.blocks, cond.blocks, cond.text):
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, modulation, text, rope, use_reentrant=False)
            else:
                tokens = block(tokens, modulation, text, rope)
        out = unpatchify(self.final(tokens, cond.final), grid, ps)  # (B, C, T', H', W')
        return out[:, :, :T, :H, :W]

    def flops_per_forward(self, num_tokens: int, text_len: int, batch: int = 1, text_kv: bool = True) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward pass: what model FLOP utilisation counts.
        text_kv=False leaves out the text's keys/values (`predict` given a made `Conditioning`)."""
        cfg, D = self.config, self.config.hidden_size
        per_block = 2 * num_tokens * D * 3 * D + 2 * num_tokens * D * D  # qkv + out proj
        per_block += 2 * 2 * num_tokens * num_tokens * D  # q @ k and attn @ v
        per_block += 2 * 2 * num_tokens * D * cfg.mlp_width  # MLP
        if cfg.cross_attention:
            per_block += 2 * num_tokens * D * D * 2 + (2 * text_len * D * 2 * D if text_kv else 0)  # q, out; kv
            per_block += 2 * 2 * num_tokens * text_len * D
        patch_dim = math.prod(cfg.patch_size) * cfg.in_channels
        total = cfg.depth * per_block + 2 * 2 * num_tokens * patch_dim * D  # + embed and final
        return batch * total
