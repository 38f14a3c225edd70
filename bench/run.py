#!/usr/bin/env python
"""soragen benchmarks: how close the DiT gets to the machine's matmul limit, how it compares with
diffusers' Wan transformer, what `soragen generate` costs end to end, how time and memory scale
with frames and resolution, and which sampler settings buy speed without losing quality.

    python bench/run.py [--quick] [--json] [--model DIR] [--only limit,dit,...] [--out FILE]

Every figure is measured in the same run as the figure it is compared with (ratios, not absolute
numbers, are what carries over between machines). Timings are the median of several repeats after
warm-up; figures from fresh processes come from bench/child.py. A full run replaces this CPU kind's
part of bench/RESULTS.md. Run it on an idle machine: anything else running skews every number.
One module per section in bench/sections/; the timing and report in bench/harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from harness import BENCH_DIR, Section, Settings, cpu_kind, find_model, keep_result, machine_line, markdown, \
    print_section
from sections import caches, diffusers, dit, e2e, limit, parallel, samplers, scaling, train, wan, wan22

SECTIONS = {"limit": limit.run, "dit": dit.run, "diffusers": diffusers.run, "e2e": e2e.run, "scaling": scaling.run,
            "samplers": samplers.run, "wan": wan.run, "wan22": wan22.run, "parallel": parallel.run,
            "train": train.run, "caches": caches.run}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, frames, steps and prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (tables go to stderr)")
    p.add_argument("--model", help="model folder or training run (default: the packaged default model)")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="write the markdown report here (default: a full run replaces this CPU "
                   "kind's part of bench/RESULTS.md; a --quick or --only run writes nothing)")
    args = p.parse_args(argv)
    args.sections = list(SECTIONS)
    if args.only:
        args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.sections if name not in SECTIONS]
        if unknown:
            p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from soragen.core.runtime import keep_freed_memory
    keep_freed_memory()  # as the soragen command does
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    from rich.console import Console
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console.width = max(console.width, 140)  # redirected output: don't wrap the tables at 80 columns
    model_dir, note = find_model(args.model)
    settings = Settings(args.quick, model_dir, note)
    machine = machine_line()
    console.print(machine, highlight=False)
    console.print()

    sections, failed = [], False
    for name in args.sections:
        try:
            with console.status(f"running {name}..."):
                section = SECTIONS[name](settings)
        except Exception as err:  # one broken section should not lose the others' figures
            console.print(traceback.format_exc(), style="red", highlight=False)
            section = Section(name, "error", notes=[f"error: {type(err).__name__}: {err}"])
            section.data["error"] = f"{type(err).__name__}: {err}"
            failed = True
        sections.append(section)
        print_section(console, section)

    targets = [t for s in sections for t in s.targets]
    if targets:
        print_section(console, Section("targets", "summary", ["target", "value", "result"],
                                       [[t["target"], t["value"], "PASS" if t["pass"] else "FAIL"] for t in targets]))
    report = markdown(machine, sections, settings)
    if args.out is not None:
        args.out.write_text(report)
        console.print(f"wrote {args.out}", highlight=False)
    elif args.quick or args.only:
        console.print("bench/RESULTS.md keeps full runs only: this one was not written (--out FILE keeps it)",
                      highlight=False)
    else:
        kind = cpu_kind()
        keep_result(BENCH_DIR / "RESULTS.md", kind, report)
        console.print(f"wrote the {kind} part of {BENCH_DIR / 'RESULTS.md'}", highlight=False)
    if args.json:
        print(json.dumps({"machine": machine, "quick": args.quick, "model": str(model_dir) if model_dir else None,
                          "sections": {s.name: {**s.data, "notes": s.notes} for s in sections},
                          "targets": targets}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
