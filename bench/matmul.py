"""The machine's matmul limit at the DiT's shapes: what MFU is measured against."""

from __future__ import annotations

import math
from typing import Callable

import torch

from harness import Settings, median_times

# (m, k, n): the guided batch's 2 x 320 tokens through the DiT's linears, the small preset's, a square.
# Timed as the DiT runs them, F.linear(x, W) with W stored (n, k): the layout matters on this CPU
# (640x1024 @ 1024x256 in bf16 ran at a fifth of the speed with the right factor stored (k, n)).
MATMUL_SHAPES = [(640, 256, 1024), (640, 1024, 256), (640, 256, 768), (640, 384, 1536), (1024, 1024, 1024)]
_limit_cache: dict[torch.dtype, float] = {}


def matmul_kernels(dtype: torch.dtype) -> list[Callable]:
    """Every way this CPU can run x @ W^T in `dtype`: F.linear, and oneDNN's kernel that the DiT
    calls at inference where it runs that dtype here (soragen.models.fast_paths); the limit is the fastest."""
    from soragen.models import fast_paths
    kernels = [lambda a, w: torch.nn.functional.linear(a, w)]
    if fast_paths.onednn_linear(dtype):
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


