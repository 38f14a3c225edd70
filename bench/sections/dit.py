"""Section dit: one denoising step of VideoDiT as the pipeline runs it, its MFU, its linears alone,
under --compile in fresh processes, and glibc's malloc settings."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from harness import Section, Settings, auto_dtype, bench_dtypes, dtype_name, median_times, run_fresh
from matmul import machine_limit
from workload import BATCH, LATENT, TEXT_LEN, dit_inputs, figure_cells, make_dit, num_tokens, step_figures, \
    step_inputs, throughput

MFU_TARGET = 0.60


def linear_calls(model, step: Callable[[], object]) -> list[tuple]:
    """(input, layer) of every nn.Linear applied in one call of `step`, to replay them on their own:
    those called as modules, and the first linear of each MLP, which an installed MLP runs inside
    its own forward (GELU fused, soragen.models.fast_paths)."""
    calls: list[tuple] = []
    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, args, out: calls.append((args[0], mod))))
        elif isinstance(m, torch.nn.Sequential) and "forward" in vars(m):  # an installed MLP
            hooks.append(m.register_forward_hook(lambda mod, args, out: calls.append((args[0], mod[0]))))
    try:
        with torch.inference_mode():
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def run(settings: Settings) -> Section:
    s = Section("dit", f"One denoising step of VideoDiT (batch {BATCH}, latent {LATENT}, text {TEXT_LEN})",
                ["preset", "dtype", "tokens", "GFLOP", "ms / step", "GFLOP/s", "limit GFLOP/s", "MFU", "target"])
    default = auto_dtype()
    for preset in ("tiny", "small"):
        for dtype in bench_dtypes():
            model = make_dit(preset, dtype)
            inputs = dit_inputs(dtype=dtype, text_dim=model.config.text_dim)
            prepared = step_inputs(model, inputs)
            # the same weights in the plain modules of soragen.models.dit (a model with packed oneDNN weights
            # cannot be copied: they are opaque tensors)
            plain = make_dit(preset, dtype, install=False)
            fns = {"step": lambda: model.predict(*prepared), "whole": lambda: model(*inputs),
                   "plain": lambda: plain.predict(*prepared)}
            times = median_times(fns, settings.warmup, settings.repeats)
            f = step_figures(model, inputs, dtype, times["step"], settings)
            s.rows.append([preset, dtype_name(dtype), *figure_cells(f), ""])
            s.data[f"{preset}/{dtype_name(dtype)}"] = f
            off = step_figures(model, inputs, dtype, times["plain"], settings)
            s.rows.append([f"{preset}, fast paths off", dtype_name(dtype), *figure_cells(off), ""])
            s.data[f"{preset}/{dtype_name(dtype)}/plain"] = off
            s.notes.append(f"'fast paths off': the {preset} {dtype_name(dtype)} step through the plain modules "
                           f"(soragen.models.fast_paths not installed, same weights), timed interleaved with the installed one: "
                           f"{off['ms']:.1f} against {f['ms']:.1f} ms, {off['ms'] / f['ms']:.2f}x.")
            if preset == "tiny" and dtype == default:
                whole = step_figures(model, inputs, dtype, times["whole"], settings, whole=True)
                s.rows.append(["tiny, whole forward", dtype_name(dtype), *figure_cells(whole), ""])
                s.data[f"tiny/{dtype_name(dtype)}/whole"] = whole
                s.notes.append(f"'whole forward': model(x, t, text, ...), which also projects the text to every "
                               f"block's keys/values and regresses the adaLN modulation at each call: "
                               f"{whole['ms']:.1f} ms against the step's {f['ms']:.1f} ms. The pipeline does that "
                               "work once per video (soragen.pipeline.CachedDiT); the step rows time model.predict.")
                linears_row(s, model, lambda: model.predict(*prepared), f["ms"] / 1e3, dtype, settings)
    for dtype in bench_dtypes():
        compiled_row(s, dtype, settings, mark=dtype == default)
    malloc_row(s, settings)
    s.notes.append("FLOPs from VideoDiT.flops_per_forward (matmuls only); MFU = achieved / limit of the same "
                   "dtype (section limit; the --compile rows: see their notes).")
    return s


def compiled_row(s: Section, dtype: torch.dtype, settings: Settings, mark: bool) -> None:
    """The --compile step in several fresh processes: here one process's steps ran 1.4x slower than
    the next one's throughout, while its matmul limit did not move, so the row is the process with
    the median MFU, and the note lists them all."""
    args = ["compiled", dtype_name(dtype)] + (["--quick"] if settings.quick else [])
    model = make_dit("tiny", dtype)
    inputs = dit_inputs(dtype=dtype, text_dim=model.config.text_dim)
    runs = []
    for _ in range(1 if settings.quick or not mark else 3):
        run = run_fresh(args, "bench/child.py compiled")
        # This machine's speed drifted by up to 1.2x between sections of one run: the limit counts as
        # the higher of the section's and the one timed between these steps' repeats.
        run["limit"] = max(machine_limit(dtype, settings), run["beside"])
        run["figures"] = step_figures(model, inputs, dtype, run["compiled_s"], settings, run["limit"])
        runs.append(run)
    median = sorted(runs, key=lambda run: run["figures"]["mfu"])[len(runs) // 2]
    f = median["figures"]
    target = ""
    if mark:
        target = s.target(f"MFU >= {MFU_TARGET:.0%} (tiny, {dtype_name(dtype)}, --compile)", f"{f['mfu']:.1%}",
                          f["mfu"] >= MFU_TARGET)
    s.rows.append(["tiny, --compile", dtype_name(dtype), *figure_cells(f), target])
    s.data[f"tiny/{dtype_name(dtype)}/compiled"] = {**f, "processes": runs}
    each = "; ".join(f"{run['figures']['mfu']:.1%} ({run['compiled_s'] * 1e3:.1f} vs eager "
                     f"{run['eager_s'] * 1e3:.1f} ms, limit {run['limit']:.0f}, first call {run['compile_s']:.0f} s)"
                     for run in runs)
    s.notes.append(f"--compile in {dtype_name(dtype)}, {len(runs)} fresh process(es), each timing the compiled and "
                   f"the eager step interleaved with the limit's matmuls: {each}. The row is the median; its "
                   f"compiled step is {median['eager_s'] / median['compiled_s']:.2f}x its eager one. A first call "
                   "pays the compile (torch's on-disk cache may have shortened it).")


def malloc_row(s: Section, settings: Settings) -> None:
    """The tiny eager step in new processes with glibc's default malloc and with the settings of
    soragen.runtime.keep_freed_memory, alternating; a step's speed depends on its process's
    allocation history, so each setting gets several processes."""
    args = ["step"] + (["--quick"] if settings.quick else [])
    runs: dict[str, list[float]] = {"default": [], "kept": []}
    for _ in range(2 if settings.quick else 4):
        for name in runs:
            runs[name].append(run_fresh(args, "bench/child.py step", env={"SORAGEN_MALLOC": name})["ms"])
    default, kept = (statistics.median(runs[n]) for n in ("default", "kept"))
    s.data["malloc"] = {name: ms for name, ms in runs.items()}
    s.notes.append(f"glibc malloc (soragen.runtime.keep_freed_memory, which the CLI and this script apply): the tiny "
                   f"eager {dtype_name(auto_dtype())} step in {len(runs['kept'])} new processes each, median "
                   f"{kept:.1f} ms with freed memory kept against {default:.1f} ms with glibc's defaults "
                   f"({default / kept:.2f}x); per process: kept {', '.join(f'{x:.1f}' for x in runs['kept'])}; "
                   f"default {', '.join(f'{x:.1f}' for x in runs['default'])}.")


def linears_row(s: Section, model, step: Callable[[], object], step_seconds: float, dtype: torch.dtype,
                settings: Settings) -> None:
    """The step's nn.Linear calls replayed back to back with nothing between them: the most an
    eager step of this size could reach, whatever the rest of the block costs."""
    from soragen.models.fast_paths import linear
    calls = linear_calls(model, step)
    flops = sum(2 * x.numel() // x.shape[-1] * layer.weight.numel() for x, layer in calls)

    def linears():  # as the step runs them (oneDNN's kernel at inference on a CPU), without the GELU
        for x, layer in calls:
            linear(layer, x)
    seconds = median_times({"linears": linears}, settings.warmup, settings.repeats)["linears"]
    f = {**throughput(num_tokens(model, LATENT[-3:]), flops, seconds, dtype, settings), "calls": len(calls)}
    s.rows.append(["tiny, its linears alone", dtype_name(dtype), *figure_cells(f), ""])
    s.data[f"tiny/{dtype_name(dtype)}/linears"] = f
    s.notes.append(f"'its linears alone': the {len(calls)} linear-layer calls of one tiny step, replayed back to back "
                   f"on the same tensors: {f['ms']:.1f} ms of the step's {step_seconds * 1e3:.1f} ms, "
                   f"{f['mfu']:.0%} of the limit. A step that spent nothing on attention, norms and "
                   "element-wise work would still be bounded by this.")


