"""VideoDiT: the diffusion transformer that predicts the velocity (or the noise) of a video latent.

A latent video (B, C, T, H, W) is cut into spacetime patches of pt x ph x pw cells; each patch
becomes one token. Tokens get a 3D sin-cos position, then pass through DiT blocks conditioned by
adaLN-Zero on c = timestep embedding + pooled text, and cross-attend to the text tokens. A final
adaLN + linear maps each token back to its patch of the prediction. What the prediction is (the
velocity, the noise, or a flow) is the noise schedule's `prediction_type`; the model does not know.

Wan 2.1 is the same model with other switches (DiTConfig): 3D RoPE on q and k instead of added
positions, one shared projection of the timestep plus a table per block instead of a linear per
block, q/k normed across heads, an MLP projecting the text, tanh GELU, no pooled text.

Image-to-video Wan (2.1 I2V, FLF2V) adds two switches: its input carries a mask and an image's
latent after the noisy latent (more input than output channels), and each block's cross-attention
attends to an image encoder's tokens (projected by `ImageProjection`) beside the text.

This file says what is computed, in plain torch, from the layers in soragen.layers. The kernels that make it fast on a CPU are
installed onto these modules from outside (`soragen.models.fast_paths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from soragen.core.config import DiTConfig
from soragen.layers.attention import TextKV, mask_bias
from soragen.layers.block import DiTBlock, FinalLayer
from soragen.layers.patches import patchify, token_grid, unpatchify
from soragen.layers.positions import TimestepEmbedder, rope_angles, sincos_3d


@dataclass
class Conditioning:
    """Everything a forward pass takes besides the noisy latent: each block's adaLN modulation
    (B, 1, 6D), the final layer's (B, 1, 2D), each block's text keys/values, and the tokens'
    positions: (N, D) sin-cos features, or RoPE's (cos, sin). `VideoDiT.condition` makes it;
    sampling reuses its parts across steps. With `segments` (runs of tokens at timesteps of their
    own, in token order: an image's latent frame at 0, the rest at the step's), the modulations are
    (B, S, 6D) and (B, S, 2D), a row per run."""

    blocks: list[torch.Tensor]
    final: torch.Tensor
    text: list[TextKV | None]
    positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    segments: list[int] | None = None


class ImageProjection(nn.Module):
    """An image encoder's tokens (B, M, image_dim) -> (B, M, D), as Wan's image embedder makes them:
    layer norm, an MLP (exact GELU), layer norm, the norms in float32. With `image_tokens`
    (first-last-frame: two images' tokens one after the other) learned positions are added first."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        width, dim = config.image_dim, config.hidden_size
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim))
        if config.image_tokens:
            self.positions = nn.Parameter(torch.zeros(1, config.image_tokens, width))

    @staticmethod
    def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "positions"):
            image = image + self.positions
        return self._norm(self.norm2, self.mlp(self._norm(self.norm1, image)))


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
        if config.image_dim:
            self.image_tokens = ImageProjection(config)
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

    def text_kv(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor | None = None) -> list[TextKV | None]:
        """text (B, L, Dt), mask (B, L) True for real tokens -> each block's cross-attention input;
        `image` (1 or B, M, image_dim): an image encoder's tokens, where the model takes them."""
        if not self.config.cross_attention:
            return [None] * len(self.blocks)
        context = self.text_tokens(text)  # (B, L, D)
        bias = mask_bias(text_mask, context.dtype) if self.config.text_mask else None
        if (image is not None) != bool(self.config.image_dim):
            raise ValueError("the DiT takes an image's tokens" if self.config.image_dim else
                             "the DiT takes no image tokens")
        if image is not None:
            image = self.image_tokens(image.to(context.dtype)).expand(context.shape[0], -1, -1)
        return [block.cross.text_kv(context, bias, image) for block in self.blocks]

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
                  pooled: torch.Tensor, image: torch.Tensor | None = None,
                  segments: list[int] | None = None) -> Conditioning:
        """`segments` (still tokens, the rest): the first run of tokens is an image's, at timestep 0,
        with a modulation row of its own."""
        c = self.condition_vector(t, pooled)
        cond = Conditioning(self.block_modulations(c), self.final.modulation(c), self.text_kv(text, text_mask, image))
        if segments:
            c = self.condition_vector(torch.zeros_like(t), pooled)
            cond.blocks = [torch.cat([s, b], dim=1) for s, b in zip(self.block_modulations(c), cond.blocks)]
            cond.final, cond.segments = torch.cat([self.final.modulation(c), cond.final], dim=1), segments
        return cond

    # ---- the forward pass ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor, image: torch.Tensor | None = None, still_frames: int = 0) -> torch.Tensor:
        """x: (B, C, T, H, W) noisy latent; t: (B,) steps; text: (B, L, Dt) tokens with mask (B, L)
        (True = real token); pooled: (B, Dt); image: an image encoder's tokens, where the model takes
        them; still_frames: leading latent frames that are an image's, at timestep 0 (Wan 2.2
        TI2V-5B). Returns the prediction, shaped like x (of `out_channels` channels, where it has them)."""
        grid = token_grid(tuple(x.shape[-3:]), self.config.patch_size)
        still = math.ceil(still_frames / self.config.patch_size[0]) * grid[1] * grid[2]
        segments = [still, math.prod(grid) - still] if still else None
        return self.predict(x, self.condition(t, text, text_mask, pooled, image, segments))

    def predict(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The forward pass given its conditioning: patches -> tokens -> blocks -> patches."""
        tokens, rope, shape = self.tokens_in(x, cond)
        return self.tokens_out(self.run_blocks(tokens, cond, rope), cond, shape)

    def tokens_in(self, x: torch.Tensor, cond: Conditioning):
        """x (B, C, T, H, W) -> the tokens (B, N, D) the first block takes (sin-cos positions added),
        RoPE's angles (or None) and (T, H, W), what `tokens_out` crops back to."""
        T, H, W = x.shape[-3:]
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
        return tokens, rope, (T, H, W)

    def run_blocks(self, tokens: torch.Tensor, cond: Conditioning, rope, start: int = 0,
                   stop: int | None = None, segments: list[int] | None | str = "cond") -> torch.Tensor:
        """The tokens through blocks[start:stop] (all of them by default); `segments`: the runs of
        tokens at timesteps of their own (default the conditioning's; a part of the tokens has its own)."""
        segments = cond.segments if segments == "cond" else segments
        blocks = self.blocks if start == 0 and stop is None else list(self.blocks)[start:stop]
        for block, modulation, text in zip(blocks, cond.blocks[start:stop], cond.text[start:stop]):
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, modulation, text, rope, segments, use_reentrant=False)
            else:
                tokens = block(tokens, modulation, text, rope, segments)
        return tokens

    def tokens_out(self, tokens: torch.Tensor, cond: Conditioning, shape: tuple[int, int, int]) -> torch.Tensor:
        """The last block's tokens -> the prediction (B, C, T, H, W) of a video of `shape` (T, H, W)."""
        return self.unpatch(self.final(tokens, cond.final, cond.segments), shape)

    def unpatch(self, patches: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The final layer's tokens (B, N, p x C) -> the prediction, cropped to `shape` (T, H, W)."""
        T, H, W = shape
        out = unpatchify(patches, token_grid(shape, self.config.patch_size), self.config.patch_size)
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
        if cfg.image_dim:  # the image tokens' attention (257 of CLIP's per image); their keys/values once
            per_block += 2 * 2 * num_tokens * (cfg.image_tokens or 257) * D
        patch_in, patch_out = (math.prod(cfg.patch_size) * c for c in (cfg.in_channels, cfg.predicted_channels))
        total = cfg.depth * per_block + 2 * num_tokens * (patch_in + patch_out) * D  # + embed and final
        return batch * total
