"""Section wan22: one guided denoising step of Wan 2.2 TI2V-5B's, one Wan 2.2 A14B expert's and Wan
2.1 I2V-14B's configurations (random weights) in our DiT against diffusers' WanTransformer3DModel,
each run as its pipeline runs it, in the dtype --dtype auto picks. The whole models do not fit a
24 GiB machine twice (ours and diffusers'), so each runs the first blocks of its depth: a step's
time is its blocks' (the embeddings and output are a few matmuls of the 192 tokens), so the ratio of
ours to diffusers' is the whole model's, and the seconds scale with the depth."""

from __future__ import annotations

import math

import torch

from harness import Section, Settings, auto_dtype, dtype_name, fmt, median_times
from matmul import looped_matmul, machine_limit, matmul_kernels

TEXT_TOKENS, PROMPT_TOKENS, IMAGE_TOKENS = 512, 24, 257  # umT5's 512 (zeros past the prompt), CLIP's 257
SPEEDUP_TARGET = 1.0  # the issue's: ours at least as fast as diffusers' at each configuration

# (name, diffusers' config of the released model, blocks run, latent (C, T, H, W) of 9 frames, the pipeline's way)
WAN_2_2_TI2V_5B = dict(patch_size=[1, 2, 2], num_attention_heads=24, attention_head_dim=128, in_channels=48,
                       out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def cases():
    from soragen.families.wan import WAN_2_1_T2V_14B
    i2v = dict(WAN_2_1_T2V_14B, in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120)
    return [("TI2V-5B (256x256: x16 VAE)", WAN_2_2_TI2V_5B, 8, (48, 3, 16, 16), "ti2v"),
            ("A14B expert (128x128)", dict(WAN_2_1_T2V_14B, in_channels=16), 4, (16, 3, 16, 16), "t2v"),
            ("I2V-14B (128x128, image tokens)", i2v, 4, (16, 3, 16, 16), "i2v")]


def models(config: dict, depth: int, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    from soragen.families.wan import from_diffusers
    from soragen.models import fast_paths
    torch.manual_seed(0)
    theirs = WanTransformer3DModel(**dict(config, num_layers=depth)).eval().requires_grad_(False).to(dtype)
    ours = from_diffusers(theirs)
    fast_paths.install(ours)
    return theirs, ours


def step_fns(theirs, ours, latent, way: str, dtype: torch.dtype) -> dict:
    """Our step (text keys/values, modulation and image keys/values made once per video, both branches
    in one batch) and diffusers' as its pipeline runs it (two passes of batch 1; TI2V-5B with a
    timestep per token, as WanPipeline with expand_timesteps gives it)."""
    from soragen.models.text import TextEmbedding
    from soragen.pipeline import CachedDiT
    g = torch.Generator().manual_seed(0)
    channels = theirs.config.in_channels
    x = torch.randn(2, channels, *latent[1:], generator=g).to(dtype)
    text = torch.randn(2, TEXT_TOKENS, 4096, generator=g)
    text[:, PROMPT_TOKENS:] = 0.0
    text = text.to(dtype)
    image = torch.randn(1, IMAGE_TOKENS, 1280, generator=g).to(dtype) if way == "i2v" else None
    t = torch.full((2,), 700.0)
    tokens = math.prod(latent[1:]) // 4
    timestep = torch.full((1, tokens), 700.0) if way == "ti2v" else t[:1]
    with torch.inference_mode():
        cached = CachedDiT(ours, ours.predict, t[:1], x.device, dtype, image)
        cond = cached.conditioning(x, t, TextEmbedding(text, torch.ones(2, TEXT_TOKENS, dtype=torch.bool), None))
    extra = {} if image is None else {"encoder_hidden_states_image": image}
    return {"ours": lambda: ours.predict(x, cond),
            "theirs": lambda: [theirs(hidden_states=x[i:i + 1], timestep=timestep, encoder_hidden_states=text[i:i + 1],
                                      return_dict=False, **extra) for i in range(2)]}, tokens


def own_limit(dim: int, ffn: int, dtype: torch.dtype) -> float:
    """The best GFLOP/s of a step's own matmul shapes (384 rows: 2 x 192 tokens)."""
    best = 0.0
    for k, n in ((dim, 3 * dim), (dim, ffn), (ffn, dim), (dim, dim)):
        a, w = torch.randn(384, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for kernel in matmul_kernels(dtype):
            fn, flops = looped_matmul(kernel, a, w)
            best = max(best, flops / median_times({"mm": fn}, 1, 3)["mm"] / 1e9)
    return best


def run(settings: Settings) -> Section:
    s = Section("wan22", "Wan 2.2 and image-to-video Wan in our DiT against diffusers' WanTransformer3DModel",
                ["case", "dtype", "blocks", "seconds", "GFLOP", "MFU", "vs ours / target"])
    dtype = auto_dtype()
    machine = machine_limit(dtype, settings)
    s.data["steps"] = {}
    for name, config, depth, latent, way in cases():
        theirs, ours = models(config, depth, dtype)
        fns, tokens = step_fns(theirs, ours, latent, way, dtype)
        times = median_times(fns, 1, 2 if settings.quick else 3)
        flops = ours.flops_per_forward(tokens, TEXT_TOKENS, batch=2, text_kv=False)
        limit = max(machine, own_limit(ours.config.hidden_size, ours.config.mlp_width, dtype))
        mfu, ratio = flops / times["ours"] / 1e9 / limit, times["theirs"] / times["ours"]
        s.rows.append([f"{name}, ours", dtype_name(dtype), f"{depth} of {config['num_layers']}",
                       f"{times['ours']:.2f}", fmt(flops / 1e9, 0), f"{mfu:.1%}", ""])
        s.rows.append([f"{name}, diffusers", dtype_name(dtype), f"{depth} of {config['num_layers']}",
                       f"{times['theirs']:.2f}", "", "", f"{ratio:.2f}x " + s.target(
                           f"ours >= {SPEEDUP_TARGET}x diffusers ({name.split(' (')[0]} step, {dtype_name(dtype)})",
                           f"{ratio:.2f}x", ratio >= SPEEDUP_TARGET)])
        s.data["steps"][name] = {"seconds": times, "mfu": mfu, "limit_gflops": limit, "ratio": ratio, "tokens": tokens,
                                 "blocks": depth,
                                 "params": sum(p.numel() for p in ours.parameters())}
        del theirs, ours, fns
    s.notes.append(f"One guided step (batch 2: conditional and unconditional) of 9 frames: 192 tokens, text "
                   f"{TEXT_TOKENS} tokens, the I2V model also {IMAGE_TOKENS} image tokens and 36 input channels. "
                   f"Each model runs its first blocks only (the column 'blocks'): both of it would not fit the "
                   f"machine's memory. MFU against the better of the machine's matmul limit ({machine:,.0f} GFLOP/s, "
                   f"section limit) and the step's own matmul shapes' (the model's width and MLP).")
    return s
