"""What `soragen inspect-patches` computes and draws: how the model sees a video.

Pixels (T, H, W) -> VAE latent (C, T', H', W') -> spacetime patches of pt x ph x pw latent cells
-> tokens. Attention compares every token with every other, so its cost grows with tokens squared.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from soragen.train.data import describe_resize, resize_and_crop
from soragen.layers.patches import token_grid
from soragen.models.model import Model
from soragen.models.vae import uint8_to_frames
from soragen.io.video import read_video


def analyse(path: Path, model: Model, frames: int | None = None) -> tuple[dict, dict]:
    """The report (JSON-able) and what the picture needs."""
    want = frames or model.video.frames
    video, fps = read_video(path, max_frames=want + 1)  # one more tells whether the clip goes on
    src_h, src_w = video.shape[1:3]
    longer = len(video) > want
    src_t = f"{want}+" if longer else str(len(video))  # a long clip is not decoded (or held) whole
    take = min(want, len(video))
    height, width = model.video.height, model.video.width
    clip = resize_and_crop(video[:take], height, width)
    with torch.no_grad():
        latent = model.vae.encode(uint8_to_frames(clip))[0]  # (C, T', H', W')
    C, T, H, W = latent.shape
    ps = model.dit.config.patch_size
    grid = token_grid((T, H, W), ps)
    num_tokens = math.prod(grid)
    D, depth = model.dit.config.hidden_size, model.dit.config.depth
    attention_flops = depth * 4 * num_tokens * num_tokens * D  # q.k and attn.v, every block
    report = {
        "video": str(path),
        "frames": take, "height": height, "width": width, "fps": fps,
        "input": f"{src_t} frames, {src_w}x{src_h}, {fps:g} fps",
        "used": f"first {take} frames" + (" of more" if longer else ""),
        "resize": describe_resize(src_h, src_w, height, width),
        "latent_shape": [C, T, H, W],
        "compression": f"x{model.vae.temporal_factor} in time (1 + {model.vae.temporal_factor}k frames -> 1 + k), "
                       f"x{model.vae.spatial_factor} in space",
        "patch_size": list(ps),
        "token_grid": list(grid),
        "tokens_per_latent_frame": grid[1] * grid[2],
        "num_tokens": num_tokens,
        "attention": f"{num_tokens}^2 = {num_tokens ** 2:,} token pairs per head and block; "
                     f"{attention_flops / 1e9:.2f} GFLOP of attention per forward pass ({depth} blocks, width {D})",
        "attention_pairs": num_tokens ** 2,
        "attention_gflop": attention_flops / 1e9,
    }
    picture = {"frames": clip, "latent": latent.float().numpy(),
               "cell": (model.vae.spatial_factor * ps[1], model.vae.spatial_factor * ps[2]),
               "temporal_factor": model.vae.temporal_factor, "patch_t": ps[0]}
    return report, picture


def draw_patches(picture: dict, report: dict, out: Path, max_frames: int = 8, zoom: int = 3) -> Path:
    """Top: input frames with the patch grid over them (a token covers one cell, across its frames).
    Bottom: every latent channel of the first latent frames as grey images."""
    frames = picture["frames"]
    step = max(1, math.ceil(len(frames) / max_frames))
    shown = list(range(0, len(frames), step))[:max_frames]
    ch, cw = picture["cell"]
    h, w = frames.shape[1] * zoom, frames.shape[2] * zoom
    latent = picture["latent"]  # (C, T', H', W')
    C, T = latent.shape[:2]
    lat_zoom = max(1, h // latent.shape[2] // 2)
    lh, lw = latent.shape[2] * lat_zoom, latent.shape[3] * lat_zoom
    rows_t = min(T, 4)
    pad, text_h = 6, 16
    width = max(len(shown) * (w + pad), C * (lw + pad)) + pad
    height = text_h + h + pad + text_h + rows_t * (lh + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), f"{report['frames']} frames {report['width']}x{report['height']} -> latent "
              f"{report['latent_shape']} -> {report['num_tokens']} tokens (patch {report['patch_size']})",
              fill=(0, 0, 0))
    for i, t in enumerate(shown):
        img = Image.fromarray(frames[t]).resize((w, h), Image.NEAREST)
        d = ImageDraw.Draw(img)
        for y in range(0, h + 1, ch * zoom):
            d.line([(0, y), (w, y)], fill=(255, 255, 0))
        for x in range(0, w + 1, cw * zoom):
            d.line([(x, 0), (x, h)], fill=(255, 255, 0))
        x0 = pad + i * (w + pad)
        canvas.paste(img, (x0, text_h))
        latent_t = 0 if t == 0 else 1 + (t - 1) // picture["temporal_factor"]  # causal: frame 0 alone
        draw.text((x0 + 2, text_h + 2), f"frame {t} -> token row {latent_t // picture['patch_t']}",
                  fill=(255, 255, 255))
    y0 = text_h + h + pad
    draw.text((pad, y0), f"latent channels (columns) x latent frames (rows): {C} x {T}, first {rows_t} shown",
              fill=(0, 0, 0))
    y0 += text_h
    for t in range(rows_t):
        for c in range(C):
            plane = latent[c, t]
            lo, hi = float(plane.min()), float(plane.max())
            grey = ((plane - lo) / (hi - lo + 1e-8) * 255).astype(np.uint8)
            img = Image.fromarray(grey).resize((lw, lh), Image.NEAREST)
            canvas.paste(img, (pad + c * (lw + pad), y0 + t * (lh + pad)))
    out.parent.mkdir(parents=True, exist_ok=True)
    from soragen.core.atomic import atomic_path
    with atomic_path(out, ".png") as tmp:  # never a half-written picture
        canvas.save(tmp)
    return out
