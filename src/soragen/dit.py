"""VideoDiT: the diffusion transformer that predicts the noise in a video latent.

A latent video (B, C, T, H, W) is cut into spacetime patches of pt x ph x pw cells; each patch
becomes one token. Tokens get a 3D sin-cos position, then pass through DiT blocks conditioned by
adaLN-Zero on c = timestep embedding + pooled text, and (optionally) cross-attend to the text
tokens. A final adaLN + linear maps each token back to its patch of predicted noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from soragen import cpu
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


# ---- the block -----------------------------------------------------------------------------------

@dataclass
class Modulation:
    shift: torch.Tensor  # (B, 1, D)
    scale: torch.Tensor
    gate: torch.Tensor


def modulate(x: torch.Tensor, m: Modulation) -> torch.Tensor:
    return torch.addcmul(m.shift, x, 1 + m.scale)  # x * (1 + scale) + shift in one pass


def _onednn_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `linear` may take oneDNN's fused kernel: no autograd (it has no backward), no
    autocast (it would not cast), not under torch.compile (there `linear` takes the custom op), a
    CPU tensor in the weight's dtype, which oneDNN runs on this CPU (`soragen.cpu`)."""
    if torch.compiler.is_compiling():  # first: torch.compile cannot trace the checks below (graph breaks)
        return False
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu") and cpu.onednn_linear(x.dtype))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


@torch.library.custom_op("soragen::linear", mutates_args=())
def _compiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """`linear` inside a torch.compile graph, opaque to inductor, so that it stays oneDNN's call:
    inductor's own addmm ran these layers 2x slower in float32 here (the compiled float32 step was
    slower than eager) and ~5% slower in bf16, and its separate GELU kernel took 155 us on the
    MLP's (640, 1024) bf16 tile, where oneDNN applies GELU to the tile in cache."""
    if x.dtype == weight.dtype and cpu.onednn_linear(x.dtype):
        return _onednn_linear(x, weight, bias, activation)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


@_compiled_linear.register_fake
def _(x, weight, bias, activation):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _weight_key(weight: torch.Tensor) -> tuple:
    """Changes when the weight does (inference tensors have no version counter, and cannot change)."""
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version, weight.dtype


def pack_linears(module: nn.Module) -> None:
    """Give each CPU nn.Linear in `module` a copy of its weight in oneDNN's blocked layout, which
    `linear` uses at inference while the weight is unchanged: oneDNN then skips reordering the
    weight at every call, 5-7% of each of the DiT's linears here (identical results). Only where
    oneDNN runs the weight's dtype on this CPU: elsewhere `linear` is torch's own, which needs the
    weight as it is, so an earlier packing (of another dtype, say) is dropped there."""
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        w = layer.weight
        if w.device.type == "cpu" and cpu.onednn_linear(w.dtype):
            with torch.no_grad():
                layer.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            layer.onednn_key = _weight_key(w)
        else:
            vars(layer).pop("onednn_weight", None)
            vars(layer).pop("onednn_key", None)


def _inference_weight(layer: nn.Linear) -> torch.Tensor:
    """`pack_linears`' copy of layer.weight if it is still the weight's (compiled graphs trust it:
    the pipeline packs right before compiling), else layer.weight."""
    packed = getattr(layer, "onednn_weight", None)
    if packed is not None and (torch.compiler.is_compiling() or layer.onednn_key == _weight_key(layer.weight)):
        return packed
    return layer.weight


def linear(x: torch.Tensor, layer: nn.Linear, activation: str = "none") -> torch.Tensor:
    """layer(x), followed by exact GELU if `activation` is "gelu". At inference on a CPU it is one
    oneDNN call with bias and GELU applied to the output tile while it is still in cache: in bf16 a
    separate GELU over the MLP's (2 x 320) x 1024 activations cost more than the matmul before it.
    Under torch.compile it is the same call, wrapped as a custom op (`_compiled_linear`)."""
    if _onednn_inference(x, layer.weight):
        return _onednn_linear(x, _inference_weight(layer), layer.bias, activation)
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.device.type == "cpu":
        return _compiled_linear(x, _inference_weight(layer), layer.bias, activation)
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if activation == "gelu" else y


# Above this many attention scores (batch x heads x queries x keys) attention goes through SDPA's
# flash kernel, which never holds them all; below it, on a CPU, through two batched matmuls.
MAX_MATERIALISED_SCORES = 1 << 24


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) True for keys to attend to -> (B, 1, 1, L) additive bias: 0 there, -inf elsewhere,
    broadcast over heads and queries. Compiled, adding it cost 110 us a block where masked_fill
    with the boolean mask cost 165 (cross-attention, 320 queries, 16 keys, bf16)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask.bool(), float("-inf"))
    return bias[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T + bias) v over (B, heads, N, d) tensors, q already scaled by 1/sqrt(d); bias from
    `mask_bias`. On a CPU at DiT sizes, matmul + softmax + matmul runs 2.5x faster in bf16 than
    SDPA's flash kernel (320 tokens: 0.57 vs 1.41 ms), which works through its tiles one query
    block at a time."""
    B, H, N, _ = q.shape
    if q.device.type != "cpu" or B * H * N * k.shape[2] > MAX_MATERIALISED_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                              scale=1.0)
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, N, L)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(-1), v)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, returned in the input's dtype.

    Written out instead of F.rms_norm: on q and k (strided bf16 views) torch's CPU kernel spent
    ~14% of a tiny DiT step copying and upcasting; these four ops cost half as much."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """`gain` multiplies the result for free (attention folds its 1/sqrt(d) in here)."""
        xf = x.float()
        weight = self.weight.float() * gain if gain != 1.0 else self.weight.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with fused QKV (self) or Q + fused KV (cross); the scores go through `attend`."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, cross: bool = False):
        super().__init__()
        self.num_heads, self.cross = num_heads, cross
        head_dim = dim // num_heads
        if cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_norm = qk_norm
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.scale = head_dim ** -0.5

    def keys_values(self, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention: the text's keys (normed) and values, (2, B, heads, L, head_dim), the same
        at every denoising step."""
        k, v = rearrange(linear(context, self.kv), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        return torch.stack([self.k_norm(k), v])

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x, or (cross) attention from x to `kv` = keys_values(text) (with
        `bias`, -inf for padding)."""
        if self.cross:
            q = rearrange(linear(x, self.q), "b n (h d) -> b h n d", h=self.num_heads)
            k, v = kv
        else:
            q, k, v = rearrange(linear(x, self.qkv), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
            k = self.k_norm(k)
        q = self.q_norm(q, gain=self.scale) if self.qk_norm else q * self.scale
        out = attend(q, k, v, bias)  # (B, heads, N, head_dim)
        return linear(rearrange(out, "b h n d -> b n (h d)"), self.proj)


class DiTBlock(nn.Module):
    """adaLN-Zero block: c regresses shift/scale/gate for attention and MLP; zero gates at init
    make the block the identity. Cross-attention to text sits between the two."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, config.num_heads, config.qk_norm)
        self.cross_attention = config.cross_attention
        if config.cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, config.num_heads, config.qk_norm, cross=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * config.mlp_ratio)
        # Exact (erf) GELU: in bf16 on CPU it runs ~6x faster than the tanh approximation DiT used.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, modulation, kv, bias):
        """x (B, N, D); modulation (B, 1, 6D) = adaLN_modulation(c); kv = cross.keys_values(text),
        and bias (B, 1, 1, L) the text's padding (`mask_bias`)."""
        attn_mod, mlp_mod = (Modulation(*m.chunk(3, dim=-1)) for m in modulation.chunk(2, -1))
        x = torch.addcmul(x, attn_mod.gate, self.attn(modulate(self.norm1(x), attn_mod)))  # x + gate * attn
        if self.cross_attention:
            x = x + self.cross(self.norm_cross(x), kv, bias)
        hidden = linear(modulate(self.norm2(x), mlp_mod), self.mlp[0], "gelu")  # self.mlp, GELU fused
        return torch.addcmul(x, mlp_mod.gate, linear(hidden, self.mlp[2]))


class FinalLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, math.prod(config.patch_size) * config.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, modulation):
        """x (B, N, D); modulation (B, 1, 2D) = adaLN_modulation(c)."""
        shift, scale = modulation.chunk(2, dim=-1)
        return linear(torch.addcmul(shift, self.norm(x), 1 + scale), self.linear)


# ---- the model -----------------------------------------------------------------------------------

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
        # The output layer starts at zero: the first prediction is "no noise".
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def positions(self, grid: tuple[int, int, int], device, dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced into the graph: a dict lookup would cost a recompile
            return sincos_3d(grid, self.config.hidden_size).to(device, dtype)
        key = (grid, str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_3d(grid, self.config.hidden_size).to(device, dtype)
        return self._pos_cache[key]

    def condition(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """c = timestep embedding + projected pooled text: (B, D)."""
        return self.time_embed(t) + self.text_pooled(pooled)

    # A forward pass is three parts, so that sampling can do the first two once per video:
    #   text_context(text)       the text's keys/values for every block (the same at every step),
    #   modulation(t, pooled)    every block's adaLN shift/scale/gate (all steps' in one batch),
    #   denoise(x, ...)          the token path: what each denoising step must run.

    def text_context(self, text: torch.Tensor, text_mask: torch.Tensor):
        """text (B, L, Dt), mask (B, L) -> (kv (depth, 2, B, heads, L, head_dim): every block's
        `keys_values`, bias (B, 1, 1, L) from `mask_bias`); (None, None) without cross-attention."""
        if not self.config.cross_attention:
            return None, None
        context = self.text_tokens(text)  # (B, L, D)
        kv = torch.stack([block.cross.keys_values(context) for block in self.blocks])
        return kv, mask_bias(text_mask, kv.dtype)

    def modulation(self, t: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,), pooled (B, Dt) -> (blocks' (B, depth, 6D), final layer's (B, 2D))."""
        c = self.condition(t, pooled)
        blocks = torch.stack([block.adaLN_modulation(c) for block in self.blocks], dim=1)
        return blocks, self.final.adaLN_modulation(c)

    def denoise(self, x: torch.Tensor, modulation: torch.Tensor, final_modulation: torch.Tensor,
                kv: torch.Tensor | None, bias: torch.Tensor | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """The token path of `forward`, given `modulation(...)` and `text_context(...)`, and the
        tokens' `positions(...)` if at hand (compiled, making them took 0.17 ms a step)."""
        B, C, T, H, W = x.shape
        ps = self.config.patch_size
        grid = token_grid((T, H, W), ps)
        padded = tuple(g * p for g, p in zip(grid, ps))
        if padded != (T, H, W):  # a partial patch at an edge: pad with zeros, crop after
            x = F.pad(x, (0, padded[2] - W, 0, padded[1] - H, 0, padded[0] - T))
        tokens = linear(patchify(x, ps), self.patch_embed)  # (B, N, D)
        tokens = tokens + (self.positions(grid, x.device, tokens.dtype) if positions is None else positions)
        for i, block in enumerate(self.blocks):
            args = (tokens, modulation[:, i:i + 1], None if kv is None else kv[i], bias)
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)
        out = unpatchify(self.final(tokens, final_modulation[:, None]), grid, ps)  # (B, C, T', H', W')
        return out[:, :, :T, :H, :W]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W) noisy latent; t: (B,) steps; text: (B, L, Dt) tokens with mask (B, L)
        (True = real token); pooled: (B, Dt). Returns predicted noise shaped like x."""
        return self.denoise(x, *self.modulation(t, pooled), *self.text_context(text, text_mask))

    def flops_per_forward(self, num_tokens: int, text_len: int, batch: int = 1, text_kv: bool = True) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward pass: what model FLOP utilisation counts.
        text_kv=False leaves out the text's keys/values (`denoise` given a `text_context`)."""
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


def compile_for_sampling(model: VideoDiT):
    """torch.compile of `model.denoise`, the per-step token path: inductor fuses the norms,
    modulation, gates and softmax into a few kernels (the linears stay matmul calls). Shapes are
    static, which compiles in a third of the time dynamic shapes take: a new video size compiles
    again, and the pipeline pads text to one length. bench/run.py measures the compile time and
    the speed-up."""
    return torch.compile(model.denoise, dynamic=False)
