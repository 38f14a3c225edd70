"""The workload every DiT figure is about: one guided denoising step of the tiny preset at the
default video (batch 2 = conditional + unconditional, latent (8, 5, 16, 16) = 16 frames at 64x64
through the tiny VAE, 16 text tokens), made as the pipeline makes it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from harness import Settings, fmt
from matmul import machine_limit

BATCH, LATENT, TEXT_LEN = 2, (8, 5, 16, 16), 16


def dit_inputs(latent=LATENT, dtype=torch.float32, text_dim=384, batch=BATCH, text_len=TEXT_LEN):
    """One guided denoising step's inputs for VideoDiT: x, t, text tokens, mask, pooled."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, *latent, generator=g).to(dtype),
            torch.full((batch,), 500.0),
            torch.randn(batch, text_len, text_dim, generator=g).to(dtype),
            torch.ones(batch, text_len, dtype=torch.bool),
            torch.randn(batch, text_dim, generator=g).to(dtype))


def step_inputs(model, inputs) -> tuple:
    """model.predict's inputs for a forward's `inputs` (x, t, text, mask, pooled), made by the
    pipeline's CachedDiT: the text's keys/values, the adaLN modulations and the positions made before
    the loop (once per video, all steps' modulations in one batch)."""
    from soragen.pipeline import CachedDiT
    from soragen.models.text import TextEmbedding
    x, t, text, mask, pooled = inputs
    cached = CachedDiT(model, model.predict, t[:1], x.device, x.dtype)
    with torch.inference_mode():
        return x, cached.conditioning(x, t, TextEmbedding(text, mask, pooled))


def num_tokens(model, latent_thw) -> int:
    """Tokens the DiT makes of a latent of (T, H, W) cells."""
    from soragen.layers.patches import token_grid
    return math.prod(token_grid(tuple(latent_thw), model.config.patch_size))


def make_dit(preset: str, dtype: torch.dtype, install: bool = True):
    """The preset's DiT with seed 0's weights, CPU fast paths installed as the pipeline does (or not)."""
    from soragen.core.config import dit_preset
    from soragen.models import fast_paths
    from soragen.models.dit import VideoDiT
    torch.manual_seed(0)
    model = VideoDiT(dit_preset(preset)).eval().requires_grad_(False).to(dtype)
    if install:
        fast_paths.install(model)
    return model


def step_figures(model, inputs, dtype: torch.dtype, seconds: float, settings: Settings,
                 limit: float | None = None, whole: bool = False) -> dict:
    """Tokens, FLOPs, achieved GFLOP/s and MFU of one denoising step (`whole`: a whole forward, with
    the text's keys/values) that took `seconds`."""
    tokens = num_tokens(model, inputs[0].shape[-3:])
    flops = model.flops_per_forward(tokens, TEXT_LEN, BATCH, text_kv=whole)
    return throughput(tokens, flops, seconds, dtype, settings, limit)


def throughput(tokens: int, flops: int, seconds: float, dtype: torch.dtype, settings: Settings,
               limit: float | None = None) -> dict:
    achieved, limit = flops / seconds / 1e9, limit or machine_limit(dtype, settings)
    return {"tokens": tokens, "flops": flops, "ms": seconds * 1e3, "gflops": achieved, "limit_gflops": limit,
            "mfu": achieved / limit}


def figure_cells(f: dict) -> list[str]:
    return [str(f["tokens"]), fmt(f["flops"] / 1e9, 2), fmt(f["ms"]), fmt(f["gflops"]), fmt(f["limit_gflops"]),
            f"{f['mfu']:.1%}"]


def bench_vae(model_dir: str | Path | None):
    """The model's VAE, or a fresh `tiny` one where there is no model (speed and memory do not
    depend on the weights)."""
    from soragen.core.config import vae_preset_config
    from soragen.models.vae import load_vae, new_vae
    vae = load_vae(Path(model_dir) / "vae") if model_dir else new_vae(vae_preset_config("tiny"))
    vae.use_fast_paths()  # as the pipeline does
    return vae
