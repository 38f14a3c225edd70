"""Wan's video VAE decoder (diffusers' `AutoencoderKLWan` decode path) in plain torch.

Decoding a video needs only the VAE's decoder, and importing diffusers costs seconds; this module
imports torch alone. It computes what diffusers computes, op for op in the same order, so in
float32 its frames are bit-identical to diffusers' (tests/test_wan_decoder.py checks it), and its
parameters are named as diffusers names them (`post_quant_conv.*`, `decoder.*`), so a Wan VAE's
safetensors load as they are. Wan 2.1 and Wan 2.2 (residual up blocks, patchified RGB) both.

How a latent video (B, z_dim, T', H', W') becomes RGB frames: it goes in one latent frame at a time.
Every convolution is causal in time (padded only on the past side), and between chunks each one
remembers the last two frames it was given, so chunk after chunk gives the same frames as the whole
video at once would, in memory that does not grow with T'. Each temporal upsampler doubles the
frames of every chunk but the first: T' latent frames give 1 + (T' - 1) * 2^k video frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # frames a causal conv remembers: its time kernel (3) less the frame it is computing

# What AutoencoderKLWan's __init__ takes, and its defaults for the keys the decoder reads. The
# others shape the encoder, or say how the adapter normalises latents: the decoder ignores them.
DECODER_DEFAULTS = dict(base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                        temperal_downsample=[False, True, True], is_residual=False, out_channels=3, patch_size=None)
OTHER_KEYS = {"attn_scales", "dropout", "latents_mean", "latents_std", "in_channels",
              "scale_factor_temporal", "scale_factor_spatial"}


def _settings(config: dict) -> dict:
    return {**DECODER_DEFAULTS, **{k: v for k, v in config.items() if k in DECODER_DEFAULTS}}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def supports(config: dict) -> bool:
    """Whether WanDecoder reproduces this AutoencoderKLWan config's decoder. False for a config it
    does not know all of (a key from a newer diffusers, another class) or that diffusers would not
    build: the caller falls back to diffusers, which says what is wrong."""
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        return False
    if any(not k.startswith("_") and k not in DECODER_DEFAULTS and k not in OTHER_KEYS for k in config):
        return False
    c = _settings(config)
    dims, down, patch = c["dim_mult"], c["temperal_downsample"], c["patch_size"]
    if not all(_positive_int(c[k]) for k in ("base_dim", "z_dim", "num_res_blocks", "out_channels")):
        return False
    if c["decoder_base_dim"] is not None and not _positive_int(c["decoder_base_dim"]):
        return False
    if not isinstance(dims, (list, tuple)) or not dims or not all(_positive_int(d) for d in dims):
        return False
    if not isinstance(down, (list, tuple)) or len(down) != len(dims) - 1 or not all(isinstance(d, bool) for d in down):
        return False
    if not isinstance(c["is_residual"], bool) or not (patch is None or _positive_int(patch)):
        return False
    if c["out_channels"] % (patch or 1) ** 2:
        return False
    if c["is_residual"]:  # the shortcut spreads each input channel over whole output channels
        widths = _widths(c)
        for i, ups in enumerate(_upsamplings(c)):
            if ups and widths[i + 1] * (2 if ups == "upsample3d" else 1) * 4 % widths[i]:
                return False
    return True


def _widths(c: dict) -> list[int]:
    """Channels between the decoder's stages: the deepest first, then dim_mult backwards."""
    base = c["decoder_base_dim"] or c["base_dim"]
    return [base * m for m in [c["dim_mult"][-1], *c["dim_mult"][::-1]]]


def _upsamplings(c: dict) -> list[str | None]:
    """Each up block's upsampling: in time and space, in space alone, or none (the last block)."""
    in_time = list(c["temperal_downsample"])[::-1]
    last = len(c["dim_mult"]) - 1
    return [None if i == last else "upsample3d" if in_time[i] else "upsample2d" for i in range(last + 1)]


# ---- the layers ----------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """A Conv3d zero-padded in time on the past side only. A kernel that spans time remembers the
    last CACHE_T frames of its input, which go in front of the next chunk instead of zeros.
    nn.Conv3d's own forward runs the convolution (fast_paths swaps its kernel)."""

    def __init__(self, in_dim: int, out_dim: int, kernel, padding=0):
        super().__init__(in_dim, out_dim, kernel, padding=padding)
        pt, ph, pw = self.padding
        self.causal_pad = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad's order: W, H, then T (all before)
        self.padding = (0, 0, 0)
        self.past: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = list(self.causal_pad)
        if pad[4] == 0:  # a 1-frame kernel: nothing to remember, nothing to pad
            return super().forward(x)
        recent = x[:, :, -CACHE_T:].clone()
        if self.past is not None:
            if recent.shape[2] < CACHE_T:
                recent = torch.cat([self.past[:, :, -1:], recent], dim=2)
            x = torch.cat([self.past, x], dim=2)
            pad[4] -= self.past.shape[2]
        self.past = recent
        return super().forward(F.pad(x, pad))


class RMSNorm(nn.Module):
    """x / ||x|| over channels (dim 1), times sqrt(channels) and a learned gain per channel;
    computed in float32 for half-precision inputs."""

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *[1] * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        unit = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
        return unit * self.scale * self.gamma


class ResBlock(nn.Module):
    """(RMS norm, SiLU, causal 3x3x3 conv) twice, plus the input (through a 1x1x1 conv where the
    channel count changes)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(F.silu(self.norm2(x)))
        return x + skip


def _frames_as_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _images_as_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W), as a view."""
    return x.view(b, -1, *x.shape[1:]).permute(0, 2, 1, 3, 4)


class Attention(nn.Module):
    """One-head self-attention among the pixels of each frame, added to its input."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = self.to_qkv(self.norm(_frames_as_images(x)))  # (B*T, 3C, H, W)
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()  # (B*T, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, HW, C)
        y = self.proj(y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return _images_as_frames(y, b) + x


class Upsample(nn.Module):
    """Twice the height and width (nearest pixel, then a 3x3 conv to `out_dim` channels); in
    "upsample3d" mode first twice the frames, each frame made two by a causal conv in time. The
    first chunk's single frame stays one: the time conv first sees the second chunk."""

    def __init__(self, dim: int, mode: str, out_dim: int):
        super().__init__()
        self.mode = mode
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, out_dim, 3, padding=1))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and not first:
            x = self.time_conv(x).reshape(b, 2, c, t, h, w)  # two frames for each one, frame by frame:
            x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
        if x.dtype in (torch.float16, torch.bfloat16):  # nearest-pixel copies, through float32
            images = self.resample[0](_frames_as_images(x).float()).to(x.dtype)
        else:
            images = self.resample[0](_frames_as_images(x))
        return _images_as_frames(self.resample[1](images), b)


def spread_up(x: torch.Tensor, out_dim: int, factor_t: int, first: bool) -> torch.Tensor:
    """Wan 2.2's parameter-free upsampling shortcut: each channel repeated, and the repeats laid out
    over the 2x2 (x2 in time) cells each input cell becomes. The first chunk keeps its last frame."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_dim * factor_t * 4 // c, dim=1)
    x = x.view(b, out_dim, factor_t, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).contiguous()
    x = x.view(b, out_dim, t * factor_t, h * 2, w * 2)
    return x[:, :, factor_t - 1:] if first else x


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an upsampler (but in the last block). Wan 2.1's
    upsampler halves the channels. Wan 2.2's (`residual`) keeps them and adds spread_up's shortcut
    of the block's input, and its upsampler is named `upsampler`, not `upsamplers.0`."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, residual: bool):
        super().__init__()
        self.residual, self.out_dim = residual, out_dim
        self.factor_t = 2 if mode == "upsample3d" else 1
        self.resnets = nn.ModuleList([ResBlock(in_dim if i == 0 else out_dim, out_dim)
                                      for i in range(num_res_blocks + 1)])
        up = Upsample(out_dim, mode, out_dim if residual else out_dim // 2) if mode else None
        if residual:
            self.upsampler = up
        else:
            self.upsamplers = nn.ModuleList([up]) if up else None

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        block_input = x
        for resnet in self.resnets:
            x = resnet(x)
        if self.residual and self.upsampler is not None:
            return self.upsampler(x, first) + spread_up(block_input, self.out_dim, self.factor_t, first)
        if not self.residual and self.upsamplers is not None:
            return self.upsamplers[0](x, first)
        return x


class MidBlock(nn.Module):
    """Residual block, attention, residual block, at the deepest width."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([Attention(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Decoder(nn.Module):
    """diffusers' WanDecoder3d: a causal conv in, the middle block, the up blocks, norm, SiLU and a
    causal conv out to RGB (or RGB patches)."""

    def __init__(self, c: dict):
        super().__init__()
        widths, residual = _widths(c), c["is_residual"]
        self.conv_in = CausalConv3d(c["z_dim"], widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0])
        self.up_blocks = nn.ModuleList()
        for i, mode in enumerate(_upsamplings(c)):
            in_dim = widths[i] // 2 if i > 0 and not residual else widths[i]  # after a halving upsampler
            self.up_blocks.append(UpBlock(in_dim, widths[i + 1], c["num_res_blocks"], mode, residual))
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], c["out_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x, first)
        return self.conv_out(F.silu(self.norm_out(x)))


def unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3*p*p, T, H, W) -> (B, 3, T, H*p, W*p): each pixel's channels back into its p x p patch."""
    if patch == 1:
        return x
    b, channels, t, h, w = x.shape
    x = x.view(b, channels // (patch * patch), patch, patch, t, h, w).permute(0, 1, 4, 5, 3, 6, 2).contiguous()
    return x.view(b, channels // (patch * patch), t, h * patch, w * patch)


# ---- the whole ----------------------------------------------------------------------------------

def is_decoder_key(name: str) -> bool:
    """The tensors of a diffusers AutoencoderKLWan checkpoint that the decoder reads."""
    return name.startswith(("decoder.", "post_quant_conv."))


class WanDecoder(nn.Module):
    """AutoencoderKLWan's post_quant_conv and decoder, built from its config (see `supports`)."""

    def __init__(self, config: dict):
        super().__init__()
        if not supports(config):
            raise ValueError("not an AutoencoderKLWan config that WanDecoder reproduces (see supports())")
        c = _settings(config)
        self.patch = c["patch_size"] or 1
        self.post_quant_conv = CausalConv3d(c["z_dim"], c["z_dim"], 1)
        self.decoder = Decoder(c)

    @classmethod
    def from_files(cls, config: dict, files: list[Path], what: str = "VAE decoder") -> "WanDecoder":
        """The decoder with its weights from a VAE's safetensors: only the decoder's tensors are read,
        checked strictly against it (SoragenError naming the file), then loaded."""
        from soragen.core.weights import load_into
        with torch.device("meta"):
            model = cls(config)
        load_into(model, files, what, keep=is_decoder_key)
        return model.eval().requires_grad_(False)

    def forget(self) -> None:
        """Drop every conv's remembered frames: the next chunk starts a new video."""
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.past = None

    @torch.no_grad()
    def decode_frame_by_frame(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Denormalised latent (B, z_dim, T', H', W') -> each latent frame's RGB frames, unclamped
        (B, 3, 1 for the first and 2^k for the others, H, W), in turn."""
        self.forget()
        try:
            z = self.post_quant_conv(z)
            for i in range(z.shape[2]):
                yield unpatchify(self.decoder(z[:, :, i:i + 1], first=i == 0), self.patch)
        finally:
            self.forget()
