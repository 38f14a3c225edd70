"""Section wan: one denoising step of Wan2.1-T2V-1.3B's configuration (its 1,419M parameters, random
weights) in our DiT against diffusers' WanTransformer3DModel, each run as its pipeline runs it, in
the dtype --dtype auto picks; loading its shards (peak memory); a tiny Wan pipeline end to end
against diffusers' WanPipeline."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from harness import Section, Settings, auto_dtype, child_argv, child_error, dtype_name, fmt, median_times, run_child, \
    run_fresh
from matmul import looped_matmul, machine_limit, matmul_kernels

SPEEDUP_TARGET, MFU_TARGET, LOAD_MEMORY_TARGET = 1.3, 0.70, 1.2
LATENT = (16, 3, 16, 16)  # 9 frames at 128x128 through Wan's VAE (x4 in time, x8 in space): 192 tokens
TEXT_TOKENS, PROMPT_TOKENS = 512, 24  # umT5's 512, zeros past the prompt


def models(dtype: torch.dtype):
    """diffusers' transformer at the 1.3B configuration, random (its own init), and our DiT with
    the same weights through soragen.families.wan's key map, CPU fast paths installed."""
    from diffusers import WanTransformer3DModel

    from soragen.models import fast_paths
    from soragen.families.wan import WAN_2_1_T2V_1_3B, from_diffusers
    torch.manual_seed(0)
    theirs = WanTransformer3DModel(**WAN_2_1_T2V_1_3B).eval().requires_grad_(False).to(dtype)
    ours = from_diffusers(theirs)
    fast_paths.install(ours)
    return theirs, ours


def step_inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *LATENT, generator=g).to(dtype)  # conditional and unconditional
    text = torch.randn(2, TEXT_TOKENS, 4096, generator=g)
    text[:, PROMPT_TOKENS:] = 0.0
    return x, torch.full((2,), 700.0), text.to(dtype)


def wan_matmul_limit(dtype: torch.dtype) -> float:
    """The best GFLOP/s of the 1.3B step's own matmul shapes (384 rows: 2 x 192 tokens)."""
    best = 0.0
    for k, n in ((1536, 4608), (1536, 8960), (8960, 1536), (1536, 1536)):
        a, w = torch.randn(384, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for kernel in matmul_kernels(dtype):
            fn, flops = looped_matmul(kernel, a, w)
            best = max(best, flops / median_times({"mm": fn}, 1, 5)["mm"] / 1e9)
    return best


def step_flops(ours, tokens: int) -> int:
    """Matmul FLOPs of the step as our pipeline runs it (text keys/values and modulation made once per video)."""
    return ours.flops_per_forward(tokens, TEXT_TOKENS, batch=2, text_kv=False)


def step_rows(s: Section, settings: Settings) -> None:
    from soragen.pipeline import CachedDiT
    from soragen.models.text import TextEmbedding
    dtype = auto_dtype()
    theirs, ours = models(dtype)
    x, t, text = step_inputs(dtype)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.bool)
    with torch.inference_mode():
        cond = CachedDiT(ours, ours.predict, t[:1], x.device, dtype).conditioning(x, t, TextEmbedding(text, mask, None))
    fns = {"ours": lambda: ours.predict(x, cond),
           "theirs, two passes": lambda: [theirs(hidden_states=x[i:i + 1], timestep=t[i:i + 1],
                                                 encoder_hidden_states=text[i:i + 1], return_dict=False)
                                          for i in range(2)],
           "theirs, one batch": lambda: theirs(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                               return_dict=False)}
    times = median_times(fns, 1, 2 if settings.quick else 3)
    limit = max(machine_limit(dtype, settings), wan_matmul_limit(dtype))
    tokens = math.prod(LATENT[1:]) // 4
    flops = step_flops(ours, tokens)
    mfu = flops / times["ours"] / 1e9 / limit
    ratio = times["theirs, two passes"] / times["ours"]
    s.rows.append(["1.3B step, ours (pipeline's way)", dtype_name(dtype), f"{times['ours']:.2f}", fmt(flops / 1e9, 0),
                   f"{mfu:.1%}", s.target(f"MFU >= {MFU_TARGET:.0%} (Wan 1.3B step, {dtype_name(dtype)})",
                                          f"{mfu:.1%}", mfu >= MFU_TARGET)])
    s.rows.append(["1.3B step, diffusers (WanPipeline's way)", dtype_name(dtype), f"{times['theirs, two passes']:.2f}",
                   "", "", f"{ratio:.2f}x " + s.target(f"ours >= {SPEEDUP_TARGET}x diffusers (Wan 1.3B step, "
                                                       f"{dtype_name(dtype)})", f"{ratio:.2f}x", ratio >= SPEEDUP_TARGET)])
    s.rows.append(["1.3B step, diffusers' model given one batch of 2", dtype_name(dtype),
                   f"{times['theirs, one batch']:.2f}", "", "", f"{times['theirs, one batch'] / times['ours']:.2f}x"])
    s.data["step"] = {"seconds": times, "mfu": mfu, "limit_gflops": limit, "ratio": ratio, "tokens": tokens,
                      "params": sum(p.numel() for p in ours.parameters())}
    s.notes.append(f"One guided denoising step at {LATENT[1]} latent frames of {LATENT[2]}x{LATENT[3]} ({tokens} tokens, "
                   f"9 frames at 128x128), text {TEXT_TOKENS} tokens, batch 2 (conditional + unconditional), "
                   f"{s.data['step']['params'] / 1e6:,.0f}M parameters. Ours as soragen's pipeline runs it: the text's "
                   f"keys/values and the modulation made once per video, both branches in one batch. diffusers' as "
                   f"WanPipeline runs it: two passes of batch 1, the text projected to every block's keys/values "
                   f"at every step (what the target compares with); and, for reference, diffusers' model given the "
                   f"two branches as one batch, which WanPipeline does not do. MFU against the machine's matmul limit (the best of section limit's shapes and this step's own) "
                   f"({limit:,.0f} GFLOP/s).")


def load_row(s: Section) -> None:
    """Our loader on the 1.3B transformer saved as diffusers saves it (bf16 shards), in a fresh process."""
    from diffusers import WanTransformer3DModel

    from soragen.families.wan import WAN_2_1_T2V_1_3B
    with tempfile.TemporaryDirectory(prefix="soragen-bench-wan-") as tmp:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**WAN_2_1_T2V_1_3B).to(torch.bfloat16)
        model.save_pretrained(Path(tmp) / "transformer", max_shard_size="1GB")
        del model
        r = run_fresh(["load", str(Path(tmp) / "transformer")], "bench/child.py load")
    ratio = r["peak_added_mb"] / r["model_mb"]
    s.rows.append(["load 1.3B (bf16 shards -> our DiT)", r["dtype"], f"{r['seconds']:.1f}", "", "",
                   f"peak +{r['peak_added_mb']:,.0f} MB for {r['model_mb']:,.0f} MB of weights: {ratio:.2f}x "
                   + s.target(f"load peak <= {LOAD_MEMORY_TARGET}x the model", f"{ratio:.2f}x", ratio <= LOAD_MEMORY_TARGET)])
    s.data["load"] = r


def e2e_rows(s: Section, settings: Settings) -> None:
    """A tiny random Wan pipeline, end to end in fresh processes: soragen generate against WanPipeline."""
    from soragen.tools.tiny_wan import tiny_pipeline
    args = dict(frames=9, height=64, width=64, steps=4 if settings.quick else 10)
    with tempfile.TemporaryDirectory(prefix="soragen-bench-wan-") as tmp:
        folder = Path(tmp) / "wan-tiny"
        tiny_pipeline().save_pretrained(folder)
        ours = run_child([sys.executable, "-m", "soragen", "generate", "a red ball moving right", "--model", str(folder),
                          "--frames", str(args["frames"]), "--height", str(args["height"]), "--width",
                          str(args["width"]), "--steps", str(args["steps"]), "--out", str(Path(tmp) / "ours")])
        theirs = run_child(child_argv("wanpipe", str(folder), json.dumps(args)))
    for name, r in (("soragen generate", ours), ("bench/child.py wanpipe", theirs)):
        if r["rc"] != 0:
            raise child_error(r, f"{name} on the tiny Wan pipeline")
    s.rows.append(["tiny Wan pipeline, soragen generate", "", f"{ours['wall']:.2f}", "", "",
                   f"peak RSS {ours['maxrss_mb']:,.0f} MB"])
    s.rows.append(["tiny Wan pipeline, diffusers WanPipeline", "", f"{theirs['wall']:.2f}", "", "",
                   f"peak RSS {theirs['maxrss_mb']:,.0f} MB"])
    s.data["e2e"] = {"ours": {k: ours[k] for k in ("wall", "maxrss_mb")},
                     "theirs": {k: theirs[k] for k in ("wall", "maxrss_mb")}, "args": args}
    s.notes.append(f"Tiny pipeline (soragen.tools.tiny_wan, random weights): {args['frames']} frames at "
                   f"{args['width']}x{args['height']}, {args['steps']} UniPC steps, each a whole new process from "
                   "the command line (imports, load, text, sampling, decode, write).")


def run(settings: Settings) -> Section:
    s = Section("wan", "Wan 2.1 in our DiT against diffusers' WanTransformer3DModel",
                ["case", "dtype", "seconds", "GFLOP", "MFU", "vs ours / target"])
    step_rows(s, settings)
    if not settings.quick:
        load_row(s)
    e2e_rows(s, settings)
    return s
