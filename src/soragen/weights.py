"""Safetensors in and out, strictly: every key must match, every shape must be the config's and
every weight must be finite. Nothing here unpickles anything.

Loading reads the files' headers first (names, shapes, dtypes; no tensor data), checks them
against the module, and only then reads the tensors, one file at a time, so a folder whose config
does not fit its weights fails at once, and a sharded checkpoint never sits in memory twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from soragen.atomic import atomic_path
from soragen.errors import SoragenError


@dataclass
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", "I64", ...


def _invalid(file: Path, err: BaseException) -> SoragenError:
    return SoragenError(f"{file} is not a valid safetensors file (truncated, or another format renamed?): "
                        f"{(str(err).splitlines() or [type(err).__name__])[0]}")


def read_header(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor the files hold, by name, from their headers alone."""
    from safetensors import SafetensorError, safe_open

    stored: dict[str, StoredTensor] = {}
    for file in files:
        if not file.is_file():
            raise SoragenError(f"missing weights file {file}")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in stored:
                        raise SoragenError(f"weight {name} is in both {stored[name].file} and {file}")
                    part = f.get_slice(name)
                    stored[name] = StoredTensor(file, tuple(part.get_shape()), part.get_dtype())
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _invalid(file, err) from err
    return stored


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
            raise _invalid(file, err) from err
    return state


def check_header(module: torch.nn.Module, stored: dict[str, StoredTensor], what: str) -> None:
    """The stored tensors are exactly the module's: same names, same shapes, floats for floats."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        files = sorted({str(t.file) for t in stored.values()}) or ["(no weights)"]
        raise SoragenError(f"{what} weights in {', '.join(files)} do not match its config: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for name, tensor in stored.items():
        want = expected[name]
        if tensor.shape != tuple(want.shape):
            raise SoragenError(f"{what} weight {name} in {tensor.file} has shape {tensor.shape}, "
                               f"its config wants {tuple(want.shape)}")
        if want.is_floating_point() and tensor.dtype not in ("F64", "F32", "F16", "BF16"):
            raise SoragenError(f"{what} weight {name} in {tensor.file} is stored as {tensor.dtype}, not as floats")


def load_into(module: torch.nn.Module, files: list[Path], what: str) -> None:
    """Load weights into `module` with strict key, shape and dtype checks from the headers, then a
    finiteness check per tensor. A module built on the meta device (no random init first) is given
    copies of the loaded tensors, in its own dtypes."""
    from safetensors import SafetensorError, safe_open

    stored = read_header(files)
    check_header(module, stored, what)
    expected = module.state_dict()
    on_meta = any(t.is_meta for t in expected.values())
    for file in files:
        part: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise SoragenError(f"{what} weight {name} in {file} holds NaN or infinite values")
                    # copy=True: a loaded tensor is a private map of the file; a weight must not depend on it
                    part[name] = tensor.to(expected[name].dtype, copy=True) if on_meta else tensor
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _invalid(file, err) from err
        module.load_state_dict(part, strict=False, assign=on_meta)


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
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
