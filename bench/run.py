#!/usr/bin/env python
"""soragen benchmarks: how close the DiT gets to the machine's matmul limit, how it compares with
diffusers' Wan transformer, what `soragen generate` costs end to end, how time and memory scale
with frames and resolution, and which sampler settings buy speed without losing quality.

    python bench/run.py [--quick] [--json] [--model DIR] [--only limit,dit,...]

Every figure is measured in the same run as the figure it is compared with (ratios, not absolute
numbers, are what carries over between machines). Timings are the median of several repeats after
warm-up; subprocess figures come from fresh processes. Writes bench/RESULTS.md.
Run it on an idle machine: anything else running skews every number.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
PROMPT = "a red ball moving right in the blue sky"
SECTIONS = ("limit", "dit", "diffusers", "e2e", "scaling", "samplers")

# The default denoising step: guided batch (cond + uncond), latent (8, 5, 16, 16) = 16 frames at
# 64x64 through the tiny VAE (x4 time, x4 space), 16 text tokens.
BATCH, LATENT, TEXT_LEN = 2, (8, 5, 16, 16), 16

# Targets, printed beside the figures.
MFU_TARGET = 0.60
DIFFUSERS_SPEEDUP_TARGET = 1.5
GENERATE_TARGET_S = 10.0
HELP_TARGET_S = 1.0
DECODE_MEMORY_RATIO_TARGET = 1.3
SAMPLER_TIME_FRACTION = 1 / 3


# ---- settings and results ------------------------------------------------------------------------

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


# ---- timing --------------------------------------------------------------------------------------

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


# ---- machine -------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    from soragen.cpu import has_fast_bf16
    load = ", load average %.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"fast bf16: {'yes' if has_fast_bf16() else 'no'}, torch {torch.__version__}, "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}{load}")


def cpu_kind() -> str:
    """The kind of CPU a run's figures belong to: AVX512-BF16 (fast bf16), or torch's name for the
    vector units it dispatches to (AVX512, AVX2, ...)."""
    from soragen.cpu import has_fast_bf16
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


# ---- 1. limit ------------------------------------------------------------------------------------

# (m, k, n): the guided batch's 2 x 320 tokens through the DiT's linears, the small preset's, a square.
# Timed as the DiT runs them, F.linear(x, W) with W stored (n, k): the layout matters on this CPU
# (640x1024 @ 1024x256 in bf16 ran at a fifth of the speed with the right factor stored (k, n)).
MATMUL_SHAPES = [(640, 256, 1024), (640, 1024, 256), (640, 256, 768), (640, 384, 1536), (1024, 1024, 1024)]
_limit_cache: dict[torch.dtype, float] = {}


def matmul_kernels(dtype: torch.dtype) -> list[Callable]:
    """Every way this CPU can run x @ W^T in `dtype`: F.linear, and oneDNN's kernel that the DiT
    calls at inference where it runs that dtype here (soragen.cpu); the limit is the fastest."""
    from soragen import cpu
    kernels = [lambda a, w: torch.nn.functional.linear(a, w)]
    if cpu.onednn_linear(dtype):
        kernels.append(lambda a, w: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""))
    return kernels


def looped_matmul(kernel: Callable, a: torch.Tensor, w: torch.Tensor) -> tuple[Callable[[], None], int]:
    """kernel(a, w) repeated to a sample of >= ~20 ms (sub-ms calls time noisily), and its FLOPs."""
    once = median_times({"mm": lambda: kernel(a, w)}, 1, 1)["mm"]
    loops = max(1, math.ceil(0.02 / once))

    def matmuls():
        for _ in range(loops):
            kernel(a, w)
    return matmuls, 2 * a.shape[0] * a.shape[1] * w.shape[0] * loops


def matmul_gflops(settings: Settings) -> dict[tuple, dict[torch.dtype, float]]:
    results: dict[tuple, dict[torch.dtype, float]] = {}
    for m, k, n in MATMUL_SHAPES:
        results[(m, k, n)] = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            best = 0.0
            for kernel in matmul_kernels(dtype):
                matmuls, flops = looped_matmul(kernel, a, w)
                seconds = median_times({"mm": matmuls}, settings.warmup, settings.repeats * 2)["mm"]
                best = max(best, flops / seconds / 1e9)
            results[(m, k, n)][dtype] = best
    for dtype in (torch.float32, torch.bfloat16):
        _limit_cache[dtype] = max(r[dtype] for r in results.values())
    return results


def limit_beside(steps: dict[str, Callable], dtype: torch.dtype, settings: Settings) -> tuple[dict, float]:
    """Median seconds of each step, timed interleaved with the limit's matmuls (each shape, each
    kernel, looped to ~20 ms); returns them and the best matmul GFLOP/s of that same window."""
    fns, flops = dict(steps), {}
    for m, k, n in MATMUL_SHAPES:
        a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for i, kernel in enumerate(matmul_kernels(dtype)):
            name = f"mm {m}x{k}x{n} #{i}"
            fns[name], flops[name] = looped_matmul(kernel, a, w)
    times = median_times(fns, settings.warmup, settings.repeats)
    return {name: times[name] for name in steps}, max(flops[name] / times[name] / 1e9 for name in flops)


def machine_limit(dtype: torch.dtype, settings: Settings) -> float:
    """GFLOP/s: the best matmul throughput at DiT-like shapes (measured once per run)."""
    if dtype not in _limit_cache:
        matmul_gflops(settings)
    return _limit_cache[dtype]


def section_limit(settings: Settings) -> Section:
    s = Section("limit", "Matmul throughput at DiT-like shapes, the faster of F.linear and oneDNN "
                "(the machine's limit)",
                ["matmul (m x k) @ (k x n)", "float32 GFLOP/s", "bfloat16 GFLOP/s", "bf16 / fp32"])
    results = matmul_gflops(settings)
    for (m, k, n), r in results.items():
        s.rows.append([f"{m}x{k} @ {k}x{n}", fmt(r[torch.float32]), fmt(r[torch.bfloat16]),
                       f"{r[torch.bfloat16] / r[torch.float32]:.2f}x"])
        s.data[f"{m}x{k}x{n}"] = {dtype_name(d): v for d, v in r.items()}
    fp32, bf16 = _limit_cache[torch.float32], _limit_cache[torch.bfloat16]
    s.rows.append(["limit (max over shapes)", fmt(fp32), fmt(bf16), f"{bf16 / fp32:.2f}x"])
    s.data["limit"] = {"float32": fp32, "bfloat16": bf16}
    return s


# ---- 2. dit --------------------------------------------------------------------------------------

def dit_inputs(latent=LATENT, dtype=torch.float32, text_dim=384, batch=BATCH, text_len=TEXT_LEN):
    """One guided denoising step's inputs for VideoDiT: x, t, text tokens, mask, pooled."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, *latent, generator=g).to(dtype),
            torch.full((batch,), 500.0),
            torch.randn(batch, text_len, text_dim, generator=g).to(dtype),
            torch.ones(batch, text_len, dtype=torch.bool),
            torch.randn(batch, text_dim, generator=g).to(dtype))


def step_inputs(model, inputs) -> tuple:
    """model.denoise's inputs for a forward's `inputs` (x, t, text, mask, pooled), made by the
    pipeline's Denoiser: the text's keys/values, the adaLN modulations and the positions made before
    the loop (once per video, all steps' modulations in one batch)."""
    from soragen.pipeline import Denoiser
    from soragen.text import TextEmbedding
    x, t, text, mask, pooled = inputs
    denoiser = Denoiser(model, model.denoise, t[:1], x.device, x.dtype)
    with torch.inference_mode():
        return denoiser.step_args(x, t, TextEmbedding(text, mask, pooled))


def num_tokens(model, latent_thw) -> int:
    """Tokens the DiT makes of a latent of (T, H, W) cells."""
    from soragen.dit import token_grid
    return math.prod(token_grid(tuple(latent_thw), model.config.patch_size))


def make_dit(preset: str, dtype: torch.dtype):
    from soragen.config import dit_preset
    from soragen.dit import VideoDiT, pack_linears
    torch.manual_seed(0)
    model = VideoDiT(dit_preset(preset)).eval().requires_grad_(False).to(dtype)
    pack_linears(model)  # as the pipeline does
    return model


def step_figures(model, inputs, dtype: torch.dtype, seconds: float, settings: Settings,
                 limit: float | None = None, whole: bool = False) -> dict:
    """Tokens, FLOPs, achieved GFLOP/s and MFU of one denoising step (`whole`: a whole forward, with
    the text's keys/values) that took `seconds`."""
    tokens = num_tokens(model, inputs[0].shape[-3:])
    flops = model.flops_per_forward(tokens, TEXT_LEN, BATCH, text_kv=whole)
    return throughput(tokens, flops, seconds, dtype, settings, limit)


def throughput(tokens: int, flops: int, seconds: float, dtype: torch.dtype, settings: Settings,
               limit: float | None = None) -> dict:
    achieved, limit = flops / seconds / 1e9, limit or machine_limit(dtype, settings)
    return {"tokens": tokens, "flops": flops, "ms": seconds * 1e3, "gflops": achieved, "limit_gflops": limit,
            "mfu": achieved / limit}


def linear_calls(model, step: Callable[[], object]) -> list[tuple]:
    """(input, layer) of every nn.Linear applied in one call of `step`, to replay them on their own:
    those called as modules, and those the DiT's blocks apply through `soragen.dit.linear`."""
    from soragen import dit
    calls: list[tuple] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((args[0], mod)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    plain = dit.linear

    def recording(x, layer, activation="none"):
        calls.append((x, layer))
        return plain(x, layer, activation)
    dit.linear = recording
    try:
        with torch.inference_mode():
            step()
    finally:
        dit.linear = plain
        for hook in hooks:
            hook.remove()
    return calls


def figure_cells(f: dict) -> list[str]:
    return [str(f["tokens"]), fmt(f["flops"] / 1e9, 2), fmt(f["ms"]), fmt(f["gflops"]), fmt(f["limit_gflops"]),
            f"{f['mfu']:.1%}"]


def section_dit(settings: Settings) -> Section:
    s = Section("dit", f"One denoising step of VideoDiT (batch {BATCH}, latent {LATENT}, text {TEXT_LEN})",
                ["preset", "dtype", "tokens", "GFLOP", "ms / step", "GFLOP/s", "limit GFLOP/s", "MFU", "target"])
    default = auto_dtype()
    for preset in ("tiny", "small"):
        for dtype in bench_dtypes():
            model = make_dit(preset, dtype)
            inputs = dit_inputs(dtype=dtype, text_dim=model.config.text_dim)
            prepared = step_inputs(model, inputs)
            fns = {"step": lambda: model.denoise(*prepared), "whole": lambda: model(*inputs)}
            times = median_times(fns, settings.warmup, settings.repeats)
            f = step_figures(model, inputs, dtype, times["step"], settings)
            s.rows.append([preset, dtype_name(dtype), *figure_cells(f), ""])
            s.data[f"{preset}/{dtype_name(dtype)}"] = f
            if preset == "tiny" and dtype == default:
                whole = step_figures(model, inputs, dtype, times["whole"], settings, whole=True)
                s.rows.append(["tiny, whole forward", dtype_name(dtype), *figure_cells(whole), ""])
                s.data[f"tiny/{dtype_name(dtype)}/whole"] = whole
                s.notes.append(f"'whole forward': model(x, t, text, ...), which also projects the text to every "
                               f"block's keys/values and regresses the adaLN modulation at each call: "
                               f"{whole['ms']:.1f} ms against the step's {f['ms']:.1f} ms. The pipeline does that "
                               "work once per video (soragen.pipeline.Denoiser); the step rows time model.denoise.")
                linears_row(s, model, lambda: model.denoise(*prepared), f["ms"] / 1e3, dtype, settings)
    for dtype in bench_dtypes():
        compiled_row(s, dtype, settings, mark=dtype == default)
    malloc_row(s, settings)
    s.notes.append("FLOPs from VideoDiT.flops_per_forward (matmuls only); MFU = achieved / limit of the same "
                   "dtype (section limit; the --compile rows: see their notes).")
    return s


def compiled_child(dtype: torch.dtype, settings: Settings) -> None:
    """Runs in a fresh process (bench/run.py --compiled-child DTYPE): the tiny step as `--compile`
    runs it (soragen.dit.compile_for_sampling), timed interleaved with eager and with the limit's
    matmuls; its first call pays the compile (section e2e has it with an empty and a warm cache)."""
    from soragen.dit import compile_for_sampling
    model = make_dit("tiny", dtype)
    prepared = step_inputs(model, dit_inputs(dtype=dtype, text_dim=model.config.text_dim))
    compiled = compile_for_sampling(model)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(*prepared)
    compile_s = time.perf_counter() - start
    times, beside = limit_beside({"eager": lambda: model.denoise(*prepared), "compiled": lambda: compiled(*prepared)},
                                 dtype, settings)
    print(json.dumps({"eager_s": times["eager"], "compiled_s": times["compiled"], "beside": beside,
                      "compile_s": compile_s}))


def compiled_row(s: Section, dtype: torch.dtype, settings: Settings, mark: bool) -> None:
    """The --compile step in several fresh processes: here one process's steps ran 1.4x slower than
    the next one's throughout, while its matmul limit did not move, so the row is the process with
    the median MFU, and the note lists them all."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--compiled-child", dtype_name(dtype)]
    model = make_dit("tiny", dtype)
    inputs = dit_inputs(dtype=dtype, text_dim=model.config.text_dim)
    runs = []
    for _ in range(1 if settings.quick or not mark else 3):
        r = run_child(argv + (["--quick"] if settings.quick else []))
        if r["rc"] != 0:
            raise child_error(r, "bench/run.py --compiled-child")
        run = json.loads(r["stdout"].strip().splitlines()[-1])
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


def step_child(settings: Settings) -> None:
    """Runs in a fresh process (bench/run.py --step-child): the tiny eager step in the default dtype, ms."""
    dtype = auto_dtype()
    model = make_dit("tiny", dtype)
    prepared = step_inputs(model, dit_inputs(dtype=dtype, text_dim=model.config.text_dim))
    print(json.dumps({"ms": median_times({"dit": lambda: model.denoise(*prepared)}, settings.warmup,
                                         settings.repeats)["dit"] * 1e3}))


def malloc_row(s: Section, settings: Settings) -> None:
    """The tiny eager step in new processes with glibc's default malloc and with the settings of
    soragen.runtime.keep_freed_memory, alternating; a step's speed depends on its process's
    allocation history, so each setting gets several processes."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--step-child"] + (["--quick"] if settings.quick else [])
    runs: dict[str, list[float]] = {"default": [], "kept": []}
    for _ in range(2 if settings.quick else 4):
        for name in runs:
            r = run_child(argv, env={"SORAGEN_MALLOC": name})
            if r["rc"] != 0:
                raise child_error(r, "bench/run.py --step-child")
            runs[name].append(json.loads(r["stdout"].strip().splitlines()[-1])["ms"])
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
    from soragen.dit import linear
    calls = linear_calls(model, step)
    flops = sum(2 * x.numel() // x.shape[-1] * layer.weight.numel() for x, layer in calls)

    def linears():  # as the step runs them (oneDNN's kernel at inference on a CPU), without the GELU
        for x, layer in calls:
            linear(x, layer)
    seconds = median_times({"linears": linears}, settings.warmup, settings.repeats)["linears"]
    f = {**throughput(num_tokens(model, LATENT[-3:]), flops, seconds, dtype, settings), "calls": len(calls)}
    s.rows.append(["tiny, its linears alone", dtype_name(dtype), *figure_cells(f), ""])
    s.data[f"tiny/{dtype_name(dtype)}/linears"] = f
    s.notes.append(f"'its linears alone': the {len(calls)} linear-layer calls of one tiny step, replayed back to back "
                   f"on the same tensors: {f['ms']:.1f} ms of the step's {step_seconds * 1e3:.1f} ms, "
                   f"{f['mfu']:.0%} of the limit. A step that spent nothing on attention, norms and "
                   "element-wise work would still be bounded by this.")


# ---- 3. diffusers --------------------------------------------------------------------------------

def make_wan(dtype: torch.dtype, keep_fp32: bool = False):
    """Wan at our tiny size. `keep_fp32` keeps the modules diffusers' from_pretrained(torch_dtype=...)
    leaves in float32 (`_keep_in_fp32_modules`); otherwise everything is cast, like our DiT."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=8,
                                  out_channels=8, text_dim=384, freq_dim=256, ffn_dim=1024, num_layers=8,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    model.eval().requires_grad_(False)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warning about casting the fp32 modules: we do it on purpose
    try:
        model.to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if keep_fp32:
        for name, param in model.named_parameters():
            if any(keep in name.split(".") for keep in model._keep_in_fp32_modules or []):
                param.data = param.data.float()
    return model


def section_diffusers(settings: Settings) -> Section:
    s = Section("diffusers", "VideoDiT (tiny) vs diffusers' WanTransformer3DModel, same width/depth/heads/patch/inputs",
                ["dtype", "ours ms / step", "Wan ms / step", "Wan / ours", "target"])
    default = auto_dtype()
    for dtype in bench_dtypes():
        ours = make_dit("tiny", dtype)
        x, t, text, mask, pooled = dit_inputs(dtype=dtype)
        fns = {"ours": lambda: ours(x, t, text, mask, pooled)}
        # In low precision Wan runs two ways: all cast (like ours), or as diffusers loads it (norms etc. fp32).
        for keep in (False, True) if dtype != torch.float32 else (False,):
            wan = make_wan(dtype, keep)
            fns["Wan, fp32 modules kept" if keep else "Wan"] = (
                lambda wan=wan: wan(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False))
        times = median_times(fns, settings.warmup, settings.repeats)
        ours_s = times.pop("ours")
        best = min(times, key=times.get)  # the faster Wan variant is the one to beat
        ratio = times[best] / ours_s
        mark = ""
        if dtype == default:
            mark = s.target(f"faster than diffusers' Wan >= {DIFFUSERS_SPEEDUP_TARGET}x ({dtype_name(dtype)})",
                            f"{ratio:.2f}x", ratio >= DIFFUSERS_SPEEDUP_TARGET)
        for variant, wan_s in times.items():
            label = dtype_name(dtype) + (" (fp32 modules kept)" if "kept" in variant else "")
            s.rows.append([label, fmt(ours_s * 1e3), fmt(wan_s * 1e3), f"{wan_s / ours_s:.2f}x",
                           mark if variant == best else ""])
        s.data[dtype_name(dtype)] = {"ours_ms": ours_s * 1e3, "wan_ms": {k: v * 1e3 for k, v in times.items()},
                                     "ratio": ratio, "ratio_against": best}
    params = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in wan.parameters())
    s.data["params"] = {"ours": params[0], "wan": params[1]}
    s.notes.append("Both sides run a whole forward per step (ours: model(x, t, text, ...), not the pipeline's "
                   "lighter step of section dit). Wan's block is the same shape as ours: self-attention + "
                   "cross-attention to text + MLP, with adaLN-style shift/scale/gate modulation from the timestep; "
                   "width 256, 8 layers, 4 heads, "
                   f"patch (1,2,2), MLP 1024, {num_tokens(ours, x.shape[-3:])} tokens, text length {TEXT_LEN}. "
                   f"Parameters: ours {params[0] / 1e6:.2f} M, Wan {params[1] / 1e6:.2f} M. Timed interleaved; the "
                   f"target compares with the faster Wan variant.")
    return s


# ---- 4. e2e --------------------------------------------------------------------------------------

def soragen_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "soragen", *args]


def section_e2e(settings: Settings) -> Section:
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

    runs = []
    with tempfile.TemporaryDirectory(prefix="soragen-bench-") as tmp:
        model_args = ["--model", str(settings.model_dir)]
        for i in range(1 if settings.quick else 4):  # full: one warm-up run, then three measured
            timings = Path(tmp) / f"timings-{i}.json"
            r = run_child(soragen_argv("generate", PROMPT, "--out", str(Path(tmp) / f"video-{i}.mp4"), *model_args),
                          env={"SORAGEN_TIMINGS": str(timings)})
            if r["rc"] != 0:
                raise child_error(r, "soragen generate")
            r["split"] = json.loads(timings.read_text())
            runs.append(r)
    measured = runs if settings.quick else runs[1:]  # the first full run warms the disk cache
    wall = statistics.median(r["wall"] for r in measured)
    peak = max(r["maxrss_mb"] for r in measured)
    s.rows.append([f"generate wall time (median of {len(measured)})", f"{wall:.2f} s",
                   s.target(f"generate <= {GENERATE_TARGET_S:g} s", f"{wall:.2f} s", wall <= GENERATE_TARGET_S)])
    split = {k: statistics.median(r["split"][k] for r in measured if k in r["split"])
             for k in measured[0]["split"]}
    for stage in ("imports", "load", "encode", "denoise", "decode", "write", "total"):
        if stage in split:
            s.rows.append([f"  {stage} (SORAGEN_TIMINGS)", f"{split[stage]:.2f} s ({split[stage] / wall:.0%})", ""])
    s.rows.append(["  process start and exit (wall - total)", f"{wall - split.get('total', wall):.2f} s", ""])
    s.rows.append(["generate peak RSS", f"{peak:,.0f} MB", ""])
    s.data.update(generate_s=wall, split=split, peak_rss_mb=peak, model=str(settings.model_dir))
    if not settings.quick:
        compile_rows(s, model_args)
    s.notes.append(f"model: {settings.model_dir} ({settings.model_note})")
    return s


def compile_rows(s: Section, model_args: list[str]) -> None:
    """generate --compile as a new process, first with an empty torch compile cache, then with the
    cache the first run left: what a user's first and later --compile runs cost."""
    with tempfile.TemporaryDirectory(prefix="soragen-bench-") as tmp:
        cache = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        for label in ("empty", "warm"):
            timings = Path(tmp) / f"timings-{label}.json"
            r = run_child(soragen_argv("generate", PROMPT, "--compile", "--out", str(Path(tmp) / f"{label}.mp4"),
                                       *model_args), env={**cache, "SORAGEN_TIMINGS": str(timings)})
            if r["rc"] != 0:
                raise child_error(r, "soragen generate --compile")
            split = json.loads(timings.read_text())
            s.rows.append([f"generate --compile, {label} compile cache", f"{r['wall']:.2f} s "
                           f"(denoise with compiling {split['denoise']:.2f} s)", ""])
            s.data[f"generate_compile_{label}_cache"] = {"wall_s": r["wall"], "split": split}


# ---- 5. scaling ----------------------------------------------------------------------------------

def latent_frames(frames: int, temporal_factor: int = 4) -> int:
    return 1 + math.ceil((frames - 1) / temporal_factor)


def bench_vae(model_dir: str | Path | None):
    """The model's VAE, or a fresh `tiny` one where there is no model (speed and memory do not
    depend on the weights)."""
    from soragen.config import vae_preset_config
    from soragen.vae import load_vae, new_vae
    return load_vae(Path(model_dir) / "vae") if model_dir else new_vae(vae_preset_config("tiny"))


def decode_child(frames: int, model_dir: str | None) -> None:
    """Runs in a fresh process (bench/run.py --decode-child FRAMES): decode a 16x16 latent of
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


def decode_kernels_row(s: Section, settings: Settings) -> None:
    """A 16-frame decode with our oneDNN route for Conv3d (vae.use_onednn_conv3d) against torch's
    own choice, which at batch 1 is its reference slow_conv3d; timed interleaved, same VAE."""
    from soragen import cpu
    from soragen.vae import use_onednn_conv3d
    vae = bench_vae(settings.model_dir)
    if vae.dtype != torch.float32 or not cpu.onednn_conv3d(torch.float32):
        return
    twin = copy.deepcopy(vae)
    use_onednn_conv3d(twin.model, enabled=False)
    latent = torch.randn(1, *vae.latent_shape(16, 64, 64), generator=torch.Generator().manual_seed(0))
    times = median_times({"ours": lambda: vae.decode_uint8(latent, 16), "torch": lambda: twin.decode_uint8(latent, 16)},
                         1, max(3, settings.repeats // 2))
    s.rows.append(["16 frames decode, torch's conv3d choice", "5,16,16", "", "", "", f"{times['torch']:.2f}", "", ""])
    s.rows.append(["16 frames decode, oneDNN conv3d (ours)", "5,16,16", "", "", "",
                   f"{times['ours']:.2f} ({times['torch'] / times['ours']:.2f}x)", "", ""])
    s.data["decode_16f_onednn_s"], s.data["decode_16f_torch_choice_s"] = times["ours"], times["torch"]


def section_scaling(settings: Settings) -> Section:
    s = Section("scaling", "How a DiT step and VAE decode scale with frames and resolution",
                ["case", "latent T,H,W", "tokens", "DiT ms / step", "vs 16f 64px", "decode s", "decode +MB", "target"])
    frame_counts = (8, 16) if settings.quick else (8, 16, 32, 64)
    dtype = auto_dtype()
    model = make_dit("tiny", dtype)
    cases = [(f, 16) for f in frame_counts] + [(16, 32)]  # (frames, latent side): 64x64 and 128x128 pixels
    dit_ms = {}
    for frames, side in cases:
        latent = (model.config.in_channels, latent_frames(frames), side, side)
        prepared = step_inputs(model, dit_inputs(latent, dtype))
        dit_ms[(frames, side)] = median_times({"dit": lambda: model.denoise(*prepared)}, settings.warmup,
                                              settings.repeats)["dit"] * 1e3

    decode = {}
    for frames in frame_counts:
        argv = [sys.executable, str(Path(__file__).resolve()), "--decode-child", str(frames)]
        if settings.model_dir is not None:
            argv += ["--model", str(settings.model_dir)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"decode child ({frames} frames) failed: {out.stderr.strip()[-500:]}")
        decode[frames] = json.loads(out.stdout.strip().splitlines()[-1])

    reference = dit_ms[(16, 16)]
    for frames, side in cases:
        d = decode.get(frames) if side == 16 else None
        tokens = num_tokens(model, (latent_frames(frames), side, side))
        s.rows.append([f"{frames} frames, {side * 4}x{side * 4}", f"{latent_frames(frames)},{side},{side}",
                       str(tokens), fmt(dit_ms[(frames, side)]), f"{dit_ms[(frames, side)] / reference:.2f}x",
                       f"{d['seconds']:.2f}" if d else "", fmt(d["added_mb"]) if d else "", ""])
        s.data[f"{frames}f_{side * 4}px"] = {"tokens": tokens, "dit_ms": dit_ms[(frames, side)], "decode": d}
    decode_kernels_row(s, settings)
    if 64 in decode:
        ratio = decode[64]["added_mb"] / max(decode[16]["added_mb"], 1e-9)
        mark = s.target(f"decode memory 64f / 16f <= {DECODE_MEMORY_RATIO_TARGET}", f"{ratio:.2f}x",
                        ratio <= DECODE_MEMORY_RATIO_TARGET)
        s.rows.append(["decode memory 64 / 16 frames", "", "", "", "", "", f"{ratio:.2f}x", mark])
        s.data["decode_memory_ratio_64_16"] = ratio
    else:
        s.notes.append("--quick stops at 16 frames: the decode memory target (64 / 16 frames) needs a full run.")
    vae_from = f"the VAE of {settings.model_dir}" if settings.model_dir else "a fresh new_vae(tiny) (no model)"
    s.notes.append(f"DiT: tiny preset in {dtype_name(dtype)}, batch {BATCH}, text {TEXT_LEN}. Decode: "
                   f"VideoVAE.decode_uint8 with {vae_from}, each in a fresh process; 'added' is its peak RSS "
                   f"minus its RSS right before decoding.")
    return s


# ---- 6. samplers ---------------------------------------------------------------------------------

def section_samplers(settings: Settings) -> Section:
    s = Section("samplers", "Sampler settings on the eval prompt set, against DDIM 50 steps",
                ["sampler", "steps", "denoise s", "vs DDIM-50", "total s", "background", "color", "shape",
                 "direction", "all", "target"])
    if settings.model_dir is None:
        s.notes.append(f"skipped: {settings.model_note}")
        return s
    from soragen.evaluate import evaluate_pipeline
    from soragen.pipeline import Pipeline
    from soragen.shapes import load_prompt_set

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


# ---- output --------------------------------------------------------------------------------------

SECTION_FUNCTIONS = {"limit": section_limit, "dit": section_dit, "diffusers": section_diffusers,
                     "e2e": section_e2e, "scaling": section_scaling, "samplers": section_samplers}


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
    from soragen.model_io import default_model_dir, resolve_model_dir
    if arg:
        return resolve_model_dir(arg), "--model"
    default = default_model_dir()
    if default is None:
        return None, ("this install has no default model (src/soragen/weights/default is missing); "
                      "pass --model DIR")
    return default, "the packaged default model"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, frames, steps and prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (tables go to stderr)")
    p.add_argument("--model", help="model folder or training run (default: the packaged default model)")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="write the markdown report here (default: a full run replaces this CPU "
                   "kind's part of bench/RESULTS.md; a --quick or --only run writes nothing)")
    p.add_argument("--decode-child", type=int, help=argparse.SUPPRESS)  # internal: one VAE decode measurement
    p.add_argument("--step-child", action="store_true", help=argparse.SUPPRESS)  # internal: one eager tiny step
    p.add_argument("--compiled-child", help=argparse.SUPPRESS)  # internal: one compiled tiny step, in this dtype
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
    from soragen.runtime import keep_freed_memory
    keep_freed_memory()  # as the soragen command does
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    if args.decode_child is not None:
        decode_child(args.decode_child, args.model)
        return 0
    if args.step_child:
        step_child(Settings(args.quick, None, ""))
        return 0
    if args.compiled_child:
        compiled_child(getattr(torch, args.compiled_child), Settings(args.quick, None, ""))
        return 0

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
                section = SECTION_FUNCTIONS[name](settings)
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
