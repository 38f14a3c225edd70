"""`soragen eval`: generate a video per prompt of a shapes-world prompt set and score what the
pixels show (background, colour, shape, direction of motion) against what the prompt asked."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from soragen.errors import UsageError
from soragen.pipeline import Pipeline, StageTimes
from soragen.shapes import judge_video, load_prompt_set, parse_prompt_set, score


def read_prompts(path: Path | None, name: str) -> list[dict]:
    if path is None:
        return load_prompt_set(name)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    return parse_prompt_set(path.read_text(encoding="utf-8"), str(path))


def evaluate_pipeline(pipe: Pipeline, rows: list[dict], settings: dict, seed: int = 0, out: Path | None = None,
                      progress_factory=None, compile: bool = False) -> dict:
    """Generate, judge and score; with `out`, keep each video and a results.jsonl."""
    from soragen.video_io import write_video
    judgements, records = [], []
    stages = StageTimes()
    start = time.perf_counter()
    for i, row in enumerate(rows):
        bars = progress_factory(f"[{i + 1}/{len(rows)}] ") if progress_factory else None
        stages.forward = bars
        with bars or contextlib.nullcontext():
            video = pipe.generate(row["prompt"], seed=seed + i, progress=stages, **settings)
        judgement = judge_video(video)
        judgements.append(judgement)
        record = {**row, "seed": seed + i, "judged": dataclasses.asdict(judgement)}
        if out is not None:
            name = f"{i:03d}.mp4"
            write_video(out / name, video, pipe.model.video.fps)
            record["file"] = name
        records.append(record)
    seconds = time.perf_counter() - start
    if out is not None:
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"prompts": len(rows), "seconds": seconds, "stage_seconds": stages.seconds, "settings": settings,
            "scores": score(judgements, rows)}


def run_eval(model_dir: Path, prompts: Path | None, prompt_set: str, out: Path | None, limit: int | None,
             steps: int | None, sampler: str | None, guidance: float | None, seed: int, device: str, dtype: str,
             progress_factory=None, compile: bool = False) -> dict:
    rows = read_prompts(prompts, prompt_set)
    if limit is not None:
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        rows = rows[:limit]
    pipe = Pipeline.load(model_dir, device=device, dtype=dtype, compile=compile)
    settings = pipe.sampler_settings(sampler, steps, guidance)
    results = evaluate_pipeline(pipe, rows, settings, seed, out, progress_factory)
    results["model"] = str(pipe.model.path)
    if out is not None:
        (out / "scores.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
