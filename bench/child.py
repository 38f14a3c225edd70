#!/usr/bin/env python
"""One measurement in a fresh process, for bench/run.py: its result is one JSON line on stdout.

    python bench/child.py compiled DTYPE [--quick]    the tiny step as --compile runs it, beside eager
    python bench/child.py step [--quick]              the tiny eager step in the auto dtype, ms
    python bench/child.py decode FRAMES [--model DIR] peak memory a VAE decode adds, MB
    python bench/child.py load FOLDER                 peak memory of loading a Wan transformer folder
    python bench/child.py wanpipe FOLDER JSON         diffusers' WanPipeline on a folder, as a user runs it

A process's speed depends on its own history (allocations, compiled code), so these figures come
from processes that did nothing else.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from harness import Settings, auto_dtype, median_times
from matmul import limit_beside
from workload import bench_vae, dit_inputs, make_dit, step_inputs


def compiled(dtype: torch.dtype, settings: Settings) -> None:
    """The tiny step as `--compile` runs it (soragen.fast_paths.compile_for_sampling), timed interleaved with eager and with the limit's
    matmuls; its first call pays the compile (section e2e has it with an empty and a warm cache)."""
    from soragen.models.fast_paths import compile_for_sampling
    model = make_dit("tiny", dtype)
    prepared = step_inputs(model, dit_inputs(dtype=dtype, text_dim=model.config.text_dim))
    compiled = compile_for_sampling(model)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(*prepared)
    compile_s = time.perf_counter() - start
    times, beside = limit_beside({"eager": lambda: model.predict(*prepared), "compiled": lambda: compiled(*prepared)},
                                 dtype, settings)
    print(json.dumps({"eager_s": times["eager"], "compiled_s": times["compiled"], "beside": beside,
                      "compile_s": compile_s}))


def step(settings: Settings) -> None:
    """The tiny eager step in the default dtype, ms."""
    dtype = auto_dtype()
    model = make_dit("tiny", dtype)
    prepared = step_inputs(model, dit_inputs(dtype=dtype, text_dim=model.config.text_dim))
    print(json.dumps({"ms": median_times({"dit": lambda: model.predict(*prepared)}, settings.warmup,
                                         settings.repeats)["dit"] * 1e3}))


def decode(frames: int, model_dir: str | None) -> None:
    """Decode a 16x16 latent of
    `frames` frames and print the peak RSS it added, in MB."""
    import gc
    vae = bench_vae(model_dir)
    latent = torch.randn(1, vae.latent_channels, vae.latent_frames(frames), 16, 16,
                         generator=torch.Generator().manual_seed(0))
    gc.collect()
    try:  # reset the RSS high-water mark, so ru_maxrss below is the peak while decoding
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = resource_rss_mb()
    start = time.perf_counter()
    video = vae.decode_uint8(latent, frames)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"frames": frames, "shape": list(video.shape), "before_mb": before, "peak_mb": peak,
                      "added_mb": peak - before, "seconds": seconds, "hwm_reset": reset}))


def resource_rss_mb() -> float:
    """Current resident set size of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load(folder: str) -> None:
    """Our loader on a diffusers Wan transformer folder, into bf16: peak resident memory it adds
    against the size of the weights it made."""
    import gc

    from soragen.families.wan import load_transformer
    gc.collect()
    reset = _reset_peak()
    before = resource_rss_mb()
    start = time.perf_counter()
    dit = load_transformer(Path(folder), torch.bfloat16)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = sum(p.numel() * p.element_size() for p in dit.parameters()) / 2**20
    print(json.dumps({"seconds": seconds, "peak_added_mb": peak - before, "model_mb": model_mb, "hwm_reset": reset,
                      "dtype": "bfloat16"}))


def wanpipe(folder: str, settings: str) -> None:
    """diffusers' WanPipeline on a folder, from import to frames written as PNGs, as `soragen generate`
    does (bench/run.py times the whole process)."""
    from diffusers import WanPipeline
    from diffusers.utils import export_to_video  # noqa: F401 (what a diffusers user imports to write)
    args = json.loads(settings)
    pipe = WanPipeline.from_pretrained(folder, trust_remote_code=False)
    frames = pipe("a red ball moving right", height=args["height"], width=args["width"], num_frames=args["frames"],
                  num_inference_steps=args["steps"], guidance_scale=5.0, output_type="pil",
                  generator=torch.Generator("cpu").manual_seed(0)).frames[0]
    out = Path(folder).parent / "theirs"
    out.mkdir(exist_ok=True)
    for i, frame in enumerate(frames):
        frame.save(out / f"frame_{i:05d}.png")
    print(json.dumps({"frames": len(frames)}))


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux), so ru_maxrss is the peak from here on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    from soragen.core.runtime import keep_freed_memory
    keep_freed_memory()  # as the soragen command does
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("compiled", "step", "decode", "load", "wanpipe"))
    p.add_argument("arg", nargs="?", help="compiled: the dtype; decode: the frame count; load, wanpipe: a folder")
    p.add_argument("settings", nargs="?", help="wanpipe: its settings as JSON")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model")
    args = p.parse_args(argv)
    settings = Settings(args.quick, None, "")
    if args.what == "compiled":
        compiled(getattr(torch, args.arg), settings)
    elif args.what == "step":
        step(settings)
    elif args.what == "decode":
        decode(int(args.arg), args.model)
    elif args.what == "load":
        load(args.arg)
    else:
        wanpipe(args.arg, args.settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
