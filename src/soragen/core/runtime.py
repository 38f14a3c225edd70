"""Process-wide settings for fast CPU work, applied once at start by the CLI and by bench/run.py."""

from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or no such name here
        return False


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the kernel.

    A DiT step allocates and frees dozens of activations of a few MB. By default glibc serves
    blocks this size from fresh mmap'd pages or trims its heap after a free, so the next step
    pays for page faults and zeroed pages again; how often depends on the history of earlier
    allocations, so one process's steps can run much slower than another's. Here blocks up to
    32 MB come from the heap, and up to 1 GB of freed heap (more than a generate holds) is kept for
    reuse. bench/run.py (section dit) measures what it buys. Returns False, changing nothing, where the C library
    is not glibc or SORAGEN_MALLOC=default is set."""
    if os.environ.get("SORAGEN_MALLOC") == "default" or not _glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Both or neither: a fixed mmap threshold alone makes glibc trim the heap on every free.
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))


def quiet_torchao() -> None:
    """Where torchao is installed (soragen's `lowbit` extra), importing it logs lines about CUDA kernels
    a CPU build cannot load and torch warns about its enums; diffusers imports it too when it reads a
    model, and logs a line about torchao types it no longer has. None of them concerns soragen: keep
    them off stderr (errors still show)."""
    import logging
    for name in ("torchao", "diffusers.quantizers.torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def world_size() -> int:
    """How many processes torchrun started (its WORLD_SIZE); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))
