"""The training state as unsharded runs wrote it before train_state/dcp/ (soragen.train.train_state):
train_state/{model,ema,optimizer}.safetensors and optimizer.json. Read, never written, so that a run
begun then can still --resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from soragen.core.errors import SoragenError
from soragen.core.weights import finite
from soragen.train.train_state import whole

FILES = ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json"]


def check(state_dir: Path) -> None:
    """Headers only: every file there, and the optimizer's file holding each tensor its JSON names."""
    from soragen.core.jsonfile import read_json
    from soragen.core.weights import read_header
    for name in FILES:
        if not (state_dir / name).exists():
            raise SoragenError(f"{state_dir / name} is missing")
    meta = read_json(state_dir / "optimizer.json")
    stored = read_header([state_dir / "optimizer.safetensors"])
    try:
        wanted = {f"{pid}.{name}" for pid, names in meta["state"].items() for name in names}
    except (KeyError, AttributeError, TypeError) as err:
        raise SoragenError(f"{state_dir / 'optimizer.json'} is damaged ({err!r})") from err
    if wanted - set(stored):
        raise SoragenError(f"{state_dir / 'optimizer.safetensors'} does not hold the optimizer state its "
                           f"optimizer.json names ({len(wanted - set(stored))} tensors missing, e.g. "
                           f"{sorted(wanted - set(stored))[0]})")


def load(state_dir: Path, raw: torch.nn.Module, ema: torch.nn.Module, optimizer, trained: Callable) -> None:
    """The weights (all, or `trained`'s: a LoRA's), the EMA and the optimizer's moments; ValueError
    for what does not fit this run. The optimizer's settings stay the run's: a file cannot set them."""
    from soragen.core.jsonfile import read_json
    from soragen.core.weights import load_into, read_safetensors
    for module, name in ((raw, "model"), (ema, "ema")):
        file = state_dir / f"{name}.safetensors"
        if trained is whole:
            load_into(module, [file], f"checkpoint {name}")
            continue
        want, stored = trained(module), read_safetensors([file])
        if set(want) != set(stored) or any(stored[k].shape != want[k].shape for k in want):
            raise ValueError(f"{file} does not hold this run's adapter ({len(set(want) ^ set(stored))} names or "
                             f"shapes differ)")
        _finite(stored, file)
        with torch.no_grad():
            for key, tensor in stored.items():
                want[key].copy_(tensor)
    meta = read_json(state_dir / "optimizer.json")
    tensors = read_safetensors([state_dir / "optimizer.safetensors"])
    state = {int(pid): {name: tensors[f"{pid}.{name}"] for name in names} for pid, names in meta["state"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entries in state.items():
        if not 0 <= pid < len(params):
            raise ValueError(f"it holds moments of parameter {pid}, the run has {len(params)} parameters")
        for name, tensor in entries.items():
            if name != "step" and tensor.shape != params[pid].shape:
                raise ValueError(f"{pid}.{name} has shape {tuple(tensor.shape)}, its parameter "
                                 f"{tuple(params[pid].shape)}")
        _finite(entries, state_dir / "optimizer.safetensors")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not finite(tensor):
            raise ValueError(f"{name} in {file} holds NaN or infinity")
