"""What this CPU can run: the checks every CPU fast path makes before it is chosen.

CPUs differ: oneDNN's bf16 kernels need AVX512-BW/VL/DQ or AVX-NE-CONVERT and refuse to run on
AVX2-only machines, and bf16 matmuls are only fast with AVX512-BF16 or AMX. So nothing assumes a
feature: each kernel is tried once on a tiny input (the truest test of what this build of torch
can do on this CPU) and the answer is kept for the process. Where a check fails, the caller takes
torch's own kernels. `SORAGEN_FAST_PATHS=off` turns every fast path off, as the tests do to run
the plain fallbacks on any machine.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch


def fast_paths_enabled() -> bool:
    return os.environ.get("SORAGEN_FAST_PATHS", "on").lower() not in ("off", "0", "no", "false")


@functools.cache
def has_fast_bf16() -> bool:
    """True when the CPU does bf16 matmuls in hardware (AVX512-BF16 or AMX): there bf16 runs several
    times faster than float32; elsewhere it is emulated and far slower."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def _onednn_linear_runs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        x, w = torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "gelu", [], "none")
        return True
    except (RuntimeError, AttributeError, NotImplementedError):  # e.g. "bf16 path needs the cpu support ..."
        return False


@functools.cache
def _onednn_conv3d_runs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(1, 2, 2, 4, 4, dtype=dtype), torch.ones(2, 2, 1, 3, 3, dtype=dtype)
        torch.mkldnn_convolution(x, w, None, (0, 1, 1), (1, 1, 1), (1, 1, 1), 1)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def onednn_linear(dtype: torch.dtype) -> bool:
    """oneDNN's linear (with its fused GELU and prepacked weights) runs in `dtype` here."""
    return fast_paths_enabled() and _onednn_linear_runs(dtype)


def onednn_conv3d(dtype: torch.dtype) -> bool:
    """oneDNN's 3D convolution runs in `dtype` here."""
    return fast_paths_enabled() and _onednn_conv3d_runs(dtype)
