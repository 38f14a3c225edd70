"""The optimizer a run trains with (`soragen train --optimizer`): torch's AdamW, or torchao's AdamW8bit,
whose two moments are stored in 8 bits (a uint8 code per value and a float32 scale per block of 256
values, through a 256-entry lookup table) instead of float32: about a quarter of AdamW's memory.

torchao is optional (`pip install 'soragen[lowbit]'`); a run that asks for it where it cannot run is
refused before it starts. Like torchao (and bitsandbytes), only tensors of at least 4096 values
that split into whole blocks get 8-bit moments; the others keep float32 ones. torchao's step is a
torch.compile'd function: on the CPU it needs a C++ compiler (or TORCHDYNAMO_DISABLE=1, which runs it
uncompiled), and each new parameter shape compiles once per process (seconds each).

The 8-bit moments are tensor subclasses; checkpoints hold their plain parts (codes, scale, qmap:
soragen.train.train_state), so nothing is pickled.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from soragen.core.errors import UsageError
from soragen.core.runtime import quiet_torchao

BLOCK = 256  # values per float32 scale (torchao's default)
SMALLEST = 4096  # tensors with fewer values keep float32 moments (torchao's and bitsandbytes' rule)
INSTALL = "pip install 'soragen[lowbit]' (torchao>=0.18)"


def check_available(name: str, device: torch.device, fsdp: bool) -> None:
    """UsageError saying why `--optimizer name` cannot run here and what would make it run."""
    if name == "adamw":
        return
    if fsdp:
        raise UsageError("--optimizer adamw8bit does not run with --fsdp yet: soragen checkpoints torchao's 8-bit "
                         "moments whole, not as shards; use --optimizer adamw, or DDP (torchrun without --fsdp)")
    quiet_torchao()  # its import's log lines
    if importlib.util.find_spec("torchao") is None:
        raise UsageError(f"--optimizer adamw8bit needs torchao, which is not installed: {INSTALL}")
    try:
        from torchao.optim import AdamW8bit  # noqa: F401
    except Exception as err:  # an install that does not fit this torch, say
        raise UsageError(f"--optimizer adamw8bit needs torchao's AdamW8bit, which does not import here "
                         f"({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}): "
                         f"{INSTALL}") from None
    if device.type == "cpu" and os.environ.get("TORCHDYNAMO_DISABLE") != "1":  # else the step runs uncompiled
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as err:  # what torch.compile's CPU backend raises when it finds no compiler
            raise UsageError(f"--optimizer adamw8bit on the CPU needs a C++ compiler (torchao's step is compiled "
                             f"by torch.compile): {(str(err).strip().splitlines() or [''])[0][:160]}; install g++, "
                             f"set TORCHDYNAMO_DISABLE=1 (an uncompiled, slower step) or use --optimizer adamw") from None


def build(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999, eps 1e-8) over `params`, with float32 or 8-bit moments."""
    if name == "adamw8bit":
        from torchao.optim import AdamW8bit
        # torch.compile's note that torchao's moments do not hash for its cache: they compile all the same
        warnings.filterwarnings("ignore", message="OptimState8bit does not implement _stable_hash_for_caching")
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8, block_size=BLOCK)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every group (torchao keeps it as a tensor, filled in place)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def state_bytes(name: str, shapes: list[int]) -> int:
    """Bytes of the two moments of parameters with `shapes` values each."""
    if name == "adamw":
        return 8 * sum(shapes)
    total = 0
    for n in shapes:  # an 8-bit moment: a code per value, a scale per block, its 256-entry table
        total += 2 * (n + 4 * (n // BLOCK) + 4 * 256) if n >= SMALLEST and n % BLOCK == 0 else 8 * n
    return total
