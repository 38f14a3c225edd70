"""Section e2e: `soragen generate` and `soragen --help` as new processes, with the stage split."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from harness import Section, Settings, child_error, run_child

PROMPT = "a red ball moving right in the blue sky"
GENERATE_TARGET_S = 4.0  # issue 35: the first video of a newcomer, on every CPU kind
HELP_TARGET_S = 1.0


def soragen_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "soragen", *args]


def run(settings: Settings) -> Section:
    s = Section("e2e", f'soragen generate "{PROMPT}" (fresh process, default settings)',
                ["measure", "value", "target"])
    help_runs = []
    for _ in range(3):
        r = run_child(soragen_argv("--help"))
        if r["rc"] != 0:
            raise child_error(r, "soragen --help")
        help_runs.append(r["wall"])
    help_s = statistics.median(help_runs)
    s.rows.append(["soragen --help (median of 3)", f"{help_s:.2f} s",
                   s.target(f"--help < {HELP_TARGET_S:g} s", f"{help_s:.2f} s", help_s < HELP_TARGET_S)])
    s.data["help_s"] = help_s
    if settings.model_dir is None:
        s.notes.append(f"generate skipped: {settings.model_note}")
        return s

    model_args = ["--model", str(settings.model_dir)]
    runs = generates(1 if settings.quick else 4, model_args, "soragen generate")  # full: a warm-up, then three
    measured = runs if settings.quick else runs[1:]  # the first full run warms the disk cache
    wall = statistics.median(r["wall"] for r in measured)
    peak = max(r["maxrss_mb"] for r in measured)
    s.rows.append([f"generate wall time (median of {len(measured)})", f"{wall:.2f} s",
                   s.target(f"generate <= {GENERATE_TARGET_S:g} s", f"{wall:.2f} s", wall <= GENERATE_TARGET_S)])
    split = {k: statistics.median(r["split"][k] for r in measured if k in r["split"])
             for k in measured[0]["split"]}
    for stage in ("imports", "load", "encode", "denoise", "decode", "write", "total"):
        if stage in split:
            s.rows.append([f"  {stage} (--timings)", f"{split[stage]:.2f} s ({split[stage] / wall:.0%})", ""])
    s.rows.append(["  process start and exit (wall - total)", f"{wall - split.get('total', wall):.2f} s", ""])
    s.rows.append(["generate peak RSS", f"{peak:,.0f} MB", ""])
    s.data.update(generate_s=wall, split=split, peak_rss_mb=peak, model=str(settings.model_dir))
    avx2_row(s, model_args, settings.quick)
    if not settings.quick:
        compile_rows(s, model_args)
    s.notes.append(f"model: {settings.model_dir} ({settings.model_note})")
    return s


# torch's, oneDNN's and MKL's kernels held to AVX2 and the model in float32: what an AVX2-only CPU runs
# (at this CPU's clock, so an estimate of one, not a measurement).
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def generates(count: int, args: list[str], what: str, env: dict | None = None) -> list[dict]:
    """`count` runs of `soragen generate PROMPT *args` as new processes: each run's figures (run_child's),
    with its `--timings` split."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="soragen-bench-") as tmp:
        for i in range(count):
            timings = Path(tmp) / f"timings-{i}.json"
            r = run_child(soragen_argv("generate", PROMPT, "--out", str(Path(tmp) / f"video-{i}.mp4"), *args,
                                       "--timings", str(timings)), env=env)
            if r["rc"] != 0:
                raise child_error(r, what)
            r["split"] = json.loads(timings.read_text())
            runs.append(r)
    return runs


def avx2_row(s: Section, model_args: list[str], quick: bool) -> None:
    runs = generates(1 if quick else 3, ["--dtype", "float32", *model_args], "soragen generate (AVX2 kernels, float32)",
                     env=AVX2)
    middle = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]  # the median run, its own split
    wall, split = middle["wall"], middle["split"]
    parts = ", ".join(f"{k} {split[k]:.2f}" for k in ("imports", "load", "denoise", "decode") if k in split)
    s.rows.append(["generate with AVX2 kernels in float32 (an AVX2-only CPU's work at this clock)",
                   f"{wall:.2f} s ({parts})",
                   s.target(f"generate (AVX2 kernels) <= {GENERATE_TARGET_S:g} s", f"{wall:.2f} s",
                            wall <= GENERATE_TARGET_S)])
    s.data["generate_avx2_float32"] = {"wall_s": wall, "split": split, "env": AVX2}


def compile_rows(s: Section, model_args: list[str]) -> None:
    """generate --compile as a new process, first with an empty torch compile cache, then with the
    cache the first run left: what a user's first and later --compile runs cost."""
    with tempfile.TemporaryDirectory(prefix="soragen-bench-") as tmp:
        cache = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        for label in ("empty", "warm"):
            timings = Path(tmp) / f"timings-{label}.json"
            r = run_child(soragen_argv("generate", PROMPT, "--compile", "--out", str(Path(tmp) / f"{label}.mp4"),
                                       *model_args, "--timings", str(timings)), env=cache)
            if r["rc"] != 0:
                raise child_error(r, "soragen generate --compile")
            split = json.loads(timings.read_text())
            s.rows.append([f"generate --compile, {label} compile cache", f"{r['wall']:.2f} s "
                           f"(denoise with compiling {split['denoise']:.2f} s)", ""])
            s.data[f"generate_compile_{label}_cache"] = {"wall_s": r["wall"], "split": split}


