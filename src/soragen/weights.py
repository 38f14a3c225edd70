"""Safetensors in and out, strictly: every key must match and every weight must be finite.
Nothing here unpickles anything."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from soragen.errors import SoragenError


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise SoragenError(f"missing weights file {file}")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise SoragenError(f"{file} is not a valid safetensors file "
                               f"(truncated, or another format renamed?): {str(err).splitlines()[0]}") from err
    return state


def load_into(module: torch.nn.Module, files: list[Path], what: str) -> None:
    """Load weights into `module` with strict key and shape matching and a finiteness check.
    A module built on the meta device (so no random init first) is given copies of the loaded
    tensors, in its own dtypes."""
    state = read_safetensors(files)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SoragenError(f"{what} weights do not match its config: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise SoragenError(f"{what} weight {name} has shape {tuple(tensor.shape)}, "
                               f"config wants {tuple(expected[name].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SoragenError(f"{what} weight {name} holds NaN or infinite values")
    if any(t.is_meta for t in expected.values()):
        # copy=True: a loaded tensor is a private map of the file; a weight must not depend on it
        state = {name: tensor.to(expected[name].dtype, copy=True) for name, tensor in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
    else:
        module.load_state_dict(state, strict=True)


def assert_finite(module: torch.nn.Module, what: str) -> None:
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SoragenError(f"refusing to save {what}: weight {name} holds NaN or infinite values")


def save_module(module: torch.nn.Module, path: Path, what: str, dtype: torch.dtype | None = None) -> None:
    """Write a module's weights as safetensors (contiguous CPU copies), via a temporary file.
    `dtype` stores floating-point weights in another precision (bf16 halves a shipped model)."""
    from safetensors.torch import save_file

    assert_finite(module, what)
    state = {k: v.detach().to("cpu", dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
             for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)
