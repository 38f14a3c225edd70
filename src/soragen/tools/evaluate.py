"""`soragen eval`: generate a video per prompt of a shapes-world prompt set and score what the
pixels show (background, colour, shape, direction of motion) against what the prompt asked.
With `--reconstruct`, score the VAE's round trips of the clips the prompts describe instead."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from soragen.core.errors import UsageError
from soragen.io.model_folder import load_model
from soragen.models.model import Model
from soragen.pipeline import Pipeline, StageTimes
from soragen.tools.judge import judge_video, load_prompt_set, mistakes, parse_prompt_set, score


def read_prompts(path: Path | None, name: str) -> list[dict]:
    if path is None:
        return load_prompt_set(name)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    return parse_prompt_set(path.read_text(encoding="utf-8"), str(path))


def judge_all(rows: list[dict], make_video, fps: float, seed: int = 0, out: Path | None = None,
              progress_factory=None, settings: dict | None = None) -> dict:
    """Make a video per row with `make_video(row, seed, progress)`, judge it and score the lot;
    with `out`, keep each video and a results.jsonl."""
    from soragen.io.video import write_video
    judgements, records = [], []
    stages = StageTimes()
    start = time.perf_counter()
    for i, row in enumerate(rows):
        bars = progress_factory(f"[{i + 1}/{len(rows)}] ") if progress_factory else None
        stages.forward = bars
        with bars or contextlib.nullcontext():
            video = make_video(row, seed + i, stages)
        judgement = judge_video(video)
        judgements.append(judgement)
        record = {**row, "seed": seed + i, "judged": dataclasses.asdict(judgement)}
        if out is not None:
            name = f"{i:03d}.mp4"
            write_video(out / name, video, fps)
            record["file"] = name
        records.append(record)
    seconds = time.perf_counter() - start
    if out is not None:
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"prompts": len(rows), "seconds": seconds, "stage_seconds": stages.seconds, "settings": settings or {},
            "scores": score(judgements, rows), "mistakes": mistakes(judgements, rows)}


def evaluate_pipeline(pipe: Pipeline, rows: list[dict], settings: dict, seed: int = 0, out: Path | None = None,
                      progress_factory=None) -> dict:
    """Generate a video per prompt, judge and score."""
    def generate(row, video_seed, progress):
        return pipe.generate(row["prompt"], seed=video_seed, progress=progress, **settings)
    return judge_all(rows, generate, pipe.model.video.fps, seed, out, progress_factory, settings)


def evaluate_reconstructions(model: Model, rows: list[dict], seed: int = 0, out: Path | None = None,
                             progress_factory=None) -> dict:
    """Judge the VAE's round trip of each prompt's clip as the shapes world renders it: the ceiling
    a DiT can reach with this VAE, whatever it learns."""
    import random

    import torch

    from soragen.tools.shapes import ClipSpec, render_clip
    from soragen.models.vae import uint8_to_frames
    video = model.video
    if video.height != video.width:
        raise UsageError(f"--reconstruct renders square clips; this model makes {video.width}x{video.height}")

    def round_trip(row, clip_seed, progress):
        spec = ClipSpec(row["background"], row["color"], row["shape"], row["direction"])
        clip = render_clip(spec, random.Random(clip_seed), video.frames, video.height)
        progress("encode", 0, 1)
        with torch.no_grad():
            latent = model.vae.encode(uint8_to_frames(clip))
        progress("encode", 1, 1)
        progress("decode", 0, 1)
        frames = model.vae.decode_uint8(latent, video.frames)[0]
        progress("decode", 1, 1)
        return frames
    return judge_all(rows, round_trip, video.fps, seed, out, progress_factory, {"reconstruct": True})


def run_eval(model_dir: Path, prompts: Path | None, prompt_set: str, out: Path | None, limit: int | None,
             steps: int | None, sampler: str | None, guidance: float | None, seed: int, device: str, dtype: str,
             progress_factory=None, compile: bool = False, reconstruct: bool = False) -> dict:
    rows = read_prompts(prompts, prompt_set)
    if limit is not None:
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        rows = rows[:limit]
    if reconstruct:
        model = load_model(model_dir)
        results = evaluate_reconstructions(model, rows, seed, out, progress_factory)
        results["model"] = str(model.path)
    else:
        pipe = Pipeline.load(model_dir, device=device, dtype=dtype, compile=compile)
        settings = dataclasses.asdict(pipe.sampling(sampler=sampler, steps=steps, guidance=guidance))
        results = evaluate_pipeline(pipe, rows, settings, seed, out, progress_factory)
        results["model"] = str(pipe.model.path)
    if out is not None:
        (out / "scores.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
