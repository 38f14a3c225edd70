"""Section caches: seconds per video at a quality. The step caches (generate --cache) and fewer
steps against 50 uncached steps: on the shapes-world model (quality: the eval judge's scores on
the eval prompts, and each video's PSNR against the 50-step uncached one) and on the tiny random
Wan pipeline (speed only: random weights have no quality), with 4-step LCM at guidance 1 there;
and First-Block-Cache against diffusers' own hook on the same tiny WanPipeline."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import Section, Settings, dtype_name, fmt

PASS_FRACTION = 0.55  # a cache setting at most this share of the uncached DiT passes ...
ATTRS = ("background", "color", "shape", "direction", "all")  # ... each score within one prompt of uncached


def cache_settings(first_block: tuple[float, float], magcache: tuple[float, float]) -> list[tuple[str, int, str]]:
    """(label, steps, --cache) of each setting: 50/20/10 steps uncached, each cache at two thresholds on 50."""
    runs = [(f"{k} steps", k, "none") for k in (50, 20, 10)]
    runs += [(f"50 steps, {c}", 50, c) for c in (*(f"first-block:{t:g}" for t in first_block), "taylorseer:1",
                                                "taylorseer:2", *(f"magcache:{t:g}" for t in magcache))]
    return runs


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def spec_of(pipe, text: str, ratios):
    import dataclasses

    from soragen.diffusion.caches import parse_cache
    spec = parse_cache(text)
    return dataclasses.replace(spec, ratios=ratios) if spec is not None and spec.kind == "magcache" else spec


def shapes_rows(s: Section, settings: Settings) -> None:
    """The shapes-world model on the first eval prompts: every setting, judged, timed, PSNR'd."""
    from soragen.pipeline import Pipeline
    from soragen.tools.calibrate_cache import calibrate
    from soragen.tools.evaluate import judge_all
    from soragen.tools.judge import load_prompt_set

    n = 3 if settings.quick else 20
    rows = load_prompt_set("eval")[:n]
    pipe = Pipeline.load(settings.model_dir, device="cpu")
    size, guidance = pipe.video_size(), pipe.model.sampling.guidance
    pipe.generate(rows[0]["prompt"], steps=2)  # warm-up: first-call costs out of the timings
    calibration = [r["prompt"] for r in load_prompt_set("heldout")[:1 if settings.quick else 4]]
    start = time.perf_counter()
    ratios = tuple(map(tuple, calibrate(pipe, calibration, *size, pipe.sampling(steps=50))))
    s.notes.append(f"shapes: MagCache calibrated on {len(calibration)} held-out prompt(s) at 50 steps in "
                   f"{time.perf_counter() - start:.0f} s (once per model).")
    results, reference = {}, None
    for label, steps, cache in cache_settings((0.05, 0.1), (0.06, 0.12)):
        videos, seconds, passes = [], [], []

        def make(row, seed, progress, steps=steps, cache=cache):
            begin = time.perf_counter()
            video = pipe.generate(row["prompt"], seed=seed, progress=progress, steps=steps,
                                  cache=spec_of(pipe, cache, ratios))
            seconds.append(time.perf_counter() - begin)
            videos.append(video)
            passes.append(pipe.passes["run"])
            return video
        scores = judge_all(rows, make, pipe.model.video.fps, 0)["scores"]
        reference = reference or videos
        results[label] = dict(seconds=sum(seconds) / n, passes=sum(passes) / n, scores=scores,
                              psnr=sum(psnr(v, r) for v, r in zip(videos, reference)) / n)
    add_rows(s, "shapes", results, n)
    s.notes.append(f"shapes: {n} eval prompts, seeds 0..{n - 1}, {pipe.model.sampling.sampler}, guidance "
                   f"{guidance:g}, dtype {dtype_name(pipe.dtype)}, {size[0]} frames at {size[2]}x{size[1]}; "
                   f"4-step LCM needs a flow-matching model and this one is DDPM's (--sampler lcm refuses it).")


def add_rows(s: Section, model: str, results: dict, n: int | None) -> None:
    base = results["50 steps"]
    winners = []
    for label, r in results.items():
        fraction = r["passes"] / base["passes"]
        mark = ""
        if n is not None and "," in label:
            within = all(r["scores"][a] >= base["scores"][a] - 1 / n - 1e-9 for a in ATTRS)
            mark = "REACHES" if within and fraction <= PASS_FRACTION else ("scores" if within else "")
            winners += [label] if mark == "REACHES" else []
        scores = [f"{r['scores'][a]:.2f}" for a in ATTRS] if n is not None else [""] * len(ATTRS)
        s.rows.append([model, label, fmt(r["seconds"], 2), f"{r['passes']:.0f}", f"{fraction:.2f}x", *scores,
                       f"{r['psnr']:.1f}" if "psnr" in r else "", mark])
        s.data[f"{model}/{label}"] = r
    if n is not None:
        s.rows.append([model, "any cache", "", "", "", *[""] * len(ATTRS), "",
                       s.target(f"a cache at <= {PASS_FRACTION}x the uncached DiT passes, scores within one prompt",
                                ", ".join(winners) or "none", bool(winners))])


def wan_rows(s: Section, settings: Settings) -> None:
    """The tiny random Wan pipeline: seconds per video at each setting (and 4-step LCM at guidance 1)."""
    from soragen.pipeline import Pipeline
    from soragen.tools.calibrate_cache import calibrate
    from soragen.tools.tiny_wan import tiny_pipeline
    repeats = 2 if settings.quick else 5
    prompt, size = "a red ball moving right", (9, 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "wan-tiny"
        tiny_pipeline().save_pretrained(folder)
        pipe = Pipeline.load(folder, device="cpu", dtype="float32")
    pipe.generate(prompt, *size, steps=2)
    ratios = tuple(map(tuple, calibrate(pipe, [prompt], *size, pipe.sampling(steps=50))))
    results = {}
    runs = cache_settings((1.0, 1.3), (0.06, 0.25)) + [("4 steps, lcm guidance 1", 4, "lcm")]
    for label, steps, cache in runs:
        extra = dict(sampler="lcm", guidance=1.0) if cache == "lcm" else {}
        spec = None if cache == "lcm" else spec_of(pipe, cache, ratios)
        seconds = []
        for i in range(repeats):
            begin = time.perf_counter()
            pipe.generate(prompt, *size, seed=i, steps=steps, cache=spec, **extra)
            seconds.append(time.perf_counter() - begin)
        results[label] = dict(seconds=sorted(seconds)[len(seconds) // 2], passes=pipe.passes["run"])
    add_rows(s, "tiny Wan", results, None)
    s.notes.append(f"tiny Wan (soragen.tools.tiny_wan, random weights, 2 blocks: First-Block-Cache can skip one), "
                   f"{size[0]} frames at {size[2]}x{size[1]}, float32, UniPC, guidance 5; median of {repeats}. Its "
                   f"first block's residual changes far more from step to step than a trained model's, hence its "
                   f"thresholds; MagCache calibrated on the prompt itself.")
    fbc_parity_row(s)


def fbc_parity_row(s: Section, threshold: float = 1.0, steps: int = 20) -> None:
    """generate --cache first-block:T against diffusers' enable_cache(FirstBlockCacheConfig(T)) on the
    same tiny WanPipeline, float32: the passes skipped, and the latents' largest difference."""
    from diffusers import FirstBlockCacheConfig

    from soragen.diffusion.caches import CacheSpec
    from soragen.pipeline import Pipeline
    from soragen.tools.tiny_wan import tiny_pipeline
    prompt = "a red ball moving right"
    theirs = tiny_pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(Path(tmp) / "wan-tiny")
        ours = Pipeline.load(Path(tmp) / "wan-tiny", device="cpu", dtype="float32")
    latent = ours.sample_latent(prompt, 5, 32, 32, ours.sampling(steps=steps), seed=7,
                                cache=CacheSpec("first-block", threshold))
    theirs.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    calls, ran = [], set()
    theirs.transformer.register_forward_pre_hook(lambda module, args: calls.append(len(calls)))
    theirs.transformer.blocks[-1].ffn.register_forward_hook(lambda module, args, out: ran.add(calls[-1]))
    theirs.set_progress_bar_config(disable=True)
    want = theirs(prompt, generator=torch.Generator("cpu").manual_seed(7), num_inference_steps=steps,
                  output_type="latent", num_frames=5, height=32, width=32).frames
    skipped = [(c // 2, c % 2) for c in range(len(calls)) if c not in ran]
    diff = float((latent - want).abs().max())
    same = skipped == ours.passes["skipped_at"]
    value = (f"diffusers skipped {len(skipped)} of {len(calls)} passes, ours "
             f"{'the same' if same else 'OTHERS'}; latents' max |diff| {diff:.1e}")
    s.rows.append(["tiny Wan", f"first-block:{threshold:g} vs diffusers' hook, {steps} steps", "", "", "",
                   *[""] * len(ATTRS), "", s.target("First-Block-Cache skips diffusers' passes, latent within 1e-4",
                                                    value, same and diff <= 1e-4)])


def run(settings: Settings) -> Section:
    s = Section("caches", "Seconds per video: step caches and fewer steps against 50 uncached steps",
                ["model", "setting", "s / video", "DiT passes", "vs 50", *ATTRS, "PSNR dB", "target"])
    if settings.model_dir is None:
        s.notes.append(f"shapes-world rows skipped: {settings.model_note}")
    else:
        shapes_rows(s, settings)
    wan_rows(s, settings)
    return s
