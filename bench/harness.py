"""The bench's harness: settings, a section's table and targets, interleaved timing, fresh child
processes, the machine line, and the report (one part of bench/RESULTS.md per CPU kind)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Settings:
    quick: bool
    model_dir: Path | None
    model_note: str  # where the model came from, or why there is none

    @property
    def warmup(self) -> int:
        return 1 if self.quick else 3

    @property
    def repeats(self) -> int:
        return 3 if self.quick else 10


@dataclass
class Section:
    name: str
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # what --json prints
    targets: list[dict] = field(default_factory=list)  # {"target", "value", "pass"}

    def target(self, name: str, value: str, ok: bool) -> str:
        self.targets.append({"target": name, "value": value, "pass": ok})
        return "PASS" if ok else "FAIL"


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def median_times(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function. Repeats are interleaved (a, b, a, b, ...) so
    anything else happening on the machine weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_child(argv: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run `argv` from a fresh wrapper process, so RUSAGE_CHILDREN covers this one child only.
    Returns wall seconds (measured around the child alone), its peak RSS in MB, exit code, output."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - start\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'wall': wall, 'maxrss_mb': rss / 1024, 'rc': p.returncode,\n"
        "                  'stdout': p.stdout[-4000:], 'stderr': p.stderr[-4000:]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"wrapper failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def child_error(result: dict, what: str) -> RuntimeError:
    tail = (result["stderr"] or result["stdout"]).strip().splitlines()[-5:]
    return RuntimeError(f"{what} exited with {result['rc']}: " + " | ".join(tail))


def child_argv(*args: str) -> list[str]:
    """A fresh process of bench/child.py: one measurement that must not share this process's history."""
    return [sys.executable, str(BENCH_DIR / "child.py"), *args]


def run_fresh(args: list[str], what: str, env: dict | None = None) -> dict:
    """Run bench/child.py with `args` in a fresh process; its JSON result (RuntimeError if it failed)."""
    result = run_child(child_argv(*args), env=env)
    if result["rc"] != 0:
        raise child_error(result, what)
    return json.loads(result["stdout"].strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    from soragen.models.fast_paths import has_fast_bf16
    load = ", load average %.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"fast bf16: {'yes' if has_fast_bf16() else 'no'}, torch {torch.__version__}, "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}{load}")


def cpu_kind() -> str:
    """The kind of CPU a run's figures belong to: AVX512-BF16 (fast bf16), or torch's name for the
    vector units it dispatches to (AVX512, AVX2, ...)."""
    from soragen.models.fast_paths import has_fast_bf16
    return "AVX512-BF16" if has_fast_bf16() else torch.backends.cpu.get_cpu_capability()


RESULTS_HEADER = ("# bench/RESULTS.md: the last full run on each kind of CPU\n\n"
                  "`python bench/run.py` replaces the part of its own CPU kind and leaves the others.\n")


def keep_result(path: Path, kind: str, report: str) -> None:
    """Put `report` in `path` as the part headed '# CPU kind: KIND', in place of that kind's last one."""
    parts: dict[str, str] = {}
    if path.exists():
        for chunk in path.read_text().split("\n# CPU kind: ")[1:]:
            name, _, body = chunk.partition("\n")
            parts[name.strip()] = body.strip("\n")
    parts[kind] = report.strip("\n")
    path.write_text(RESULTS_HEADER + "".join(f"\n# CPU kind: {name}\n\n{body}\n" for name, body in sorted(parts.items())))


def auto_dtype() -> torch.dtype:
    from soragen.pipeline import resolve_dtype
    return resolve_dtype("auto", torch.device("cpu"))


def bench_dtypes() -> list[torch.dtype]:
    """The dtype `--dtype auto` picks on this CPU, then float32 as the reference."""
    return list(dict.fromkeys([auto_dtype(), torch.float32]))


def markdown(machine: str, sections: list[Section], settings: Settings) -> str:
    lines = [machine, "",
             f"`python bench/run.py {' '.join(sys.argv[1:])}`".replace(" `", "`") + f": medians of {settings.repeats} "
             f"repeats (matmuls {2 * settings.repeats}) after {settings.warmup} warm-up(s).", ""]
    for s in sections:
        lines += [f"## {s.name}: {s.title}", ""]
        if s.rows:
            lines.append("| " + " | ".join(s.columns) + " |")
            lines.append("|" + "|".join(" --- " for _ in s.columns) + "|")
            lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in s.rows]
            lines.append("")
        lines += [f"{note}\n" for note in s.notes]
    targets = [t for s in sections for t in s.targets]
    if targets:
        lines += ["## Targets", "", "| target | value | result |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']} | {'PASS' if t['pass'] else 'FAIL'} |" for t in targets]
        lines.append("")
    return "\n".join(lines)


def print_section(console, s: Section) -> None:
    from rich.table import Table
    table = Table(title=f"{s.name}: {s.title}", title_justify="left")
    for col in s.columns:
        table.add_column(col, justify="left" if col in (s.columns[0], "target") else "right")
    for row in s.rows:
        table.add_row(*(f"[green]{c}[/]" if c in ("PASS", "REACHES") else f"[red]{c}[/]" if c == "FAIL" else c
                        for c in row))
    if s.rows:
        console.print(table)
    else:
        console.print(f"[bold]{s.name}: {s.title}[/]")
    for note in s.notes:
        console.print(f"  {note}", style="dim", highlight=False)
    console.print()


def find_model(arg: str | None) -> tuple[Path | None, str]:
    from soragen.io.folders import default_model_dir, resolve_model_dir
    if arg:
        return resolve_model_dir(arg), "--model"
    default = default_model_dir()
    if default is None:
        return None, ("this install has no default model (src/soragen/weights/default is missing); "
                      "pass --model DIR")
    return default, "the packaged default model"


