"""Section samplers: the eval prompt set under DDIM 50 and the few-step samplers, same seeds."""

from __future__ import annotations

from harness import Section, Settings, dtype_name, fmt

SAMPLER_TIME_FRACTION = 1 / 3


def run(settings: Settings) -> Section:
    s = Section("samplers", "Sampler settings on the eval prompt set, against DDIM 50 steps",
                ["sampler", "steps", "denoise s", "vs DDIM-50", "total s", "background", "color", "shape",
                 "direction", "all", "target"])
    if settings.model_dir is None:
        s.notes.append(f"skipped: {settings.model_note}")
        return s
    from soragen.tools.evaluate import evaluate_pipeline
    from soragen.pipeline import Pipeline
    from soragen.tools.judge import load_prompt_set

    n = 6 if settings.quick else 20
    rows = load_prompt_set("eval")[:n]
    pipe = Pipeline.load(settings.model_dir, device="cpu")
    guidance = pipe.model.sampling.guidance
    step_counts = (10, 20) if settings.quick else (10, 15, 20)
    runs = [("ddim", 50)] + [(name, k) for name in ("dpm++", "unipc") for k in step_counts]
    pipe.generate(rows[0]["prompt"], steps=2, guidance=guidance)  # warm-up: first-call costs out of the timings
    results = {}
    for sampler, steps in runs:
        results[(sampler, steps)] = evaluate_pipeline(pipe, rows, {"sampler": sampler, "steps": steps,
                                                                   "guidance": guidance}, seed=0)
    ref = results[("ddim", 50)]
    attrs = ("background", "color", "shape", "direction", "all")
    for (sampler, steps), r in results.items():
        # The sampler's cost is the denoising loop; text encoding, VAE decode and judging are the same
        # work for every setting, so they are shown (total s) but not compared.
        fraction = r["stage_seconds"]["denoise"] / ref["stage_seconds"]["denoise"]
        mark = ""
        if sampler != "ddim":
            # every attribute within one prompt of DDIM-50's score
            reaches = all(r["scores"][a] >= ref["scores"][a] - 1 / n - 1e-9 for a in attrs)
            mark = ("REACHES" if fraction <= SAMPLER_TIME_FRACTION else "scores, too slow") if reaches else ""
        s.rows.append([sampler, str(steps), fmt(r["stage_seconds"]["denoise"]), f"{fraction:.2f}x",
                       fmt(r["seconds"]), *(f"{r['scores'][a]:.2f}" for a in attrs), mark])
        s.data[f"{sampler}/{steps}"] = {"seconds": r["seconds"], "denoise_seconds": r["stage_seconds"]["denoise"],
                                        "scores": r["scores"], "vs_ddim50": fraction}
    winners = [f"{row[0]} {row[1]}" for row in s.rows if row[-1] == "REACHES"]
    s.rows.append(["any setting", "", "", "", "", "", "", "", "", "",
                   s.target("a sampler setting reaches DDIM-50's scores (each within one prompt) in <= 1/3 of its "
                            "denoising time",
                            ", ".join(winners) or "none", bool(winners))])
    s.notes.append(f"{n} prompts of the eval set, seeds 0..{n - 1} for every setting, guidance {guidance:g}, "
                   f"dtype {dtype_name(pipe.dtype)}; model {settings.model_dir}.")
    return s


