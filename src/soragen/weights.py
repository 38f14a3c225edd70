"""Safetensors in and out, strictly: every key must match, every shape must be the config's and
every weight must be finite. Nothing here unpickles anything.

Loading reads the files' headers first (names, shapes, dtypes; no tensor data), checks them
against the module, and only then reads the tensors, one file at a time, so a folder whose config
does not fit its weights fails at once, and a sharded checkpoint never sits in memory twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def weight_files(folder: Path, what: str) -> list[Path]:
    """A folder's safetensors: the files its *.safetensors.index.json names, or every *.safetensors."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise SoragenError(f"{index[0]} is not a safetensors index (a JSON object with a weight_map): "
                               f"{err}") from err
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise SoragenError(f"{index[0]}: weight_map must name files in {folder}, got {names[:3]}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SoragenError(f"{what} folder {folder} has no .safetensors weights")
    return files


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


@dataclass
class Mapping:
    """How stored tensors become a module's: `rules` are (our key, source keys, combine), with
    `shape(rule, source shapes)` and `combine(rule, source tensors)` (soragen.wan's key map), or
    None for the identity (each key stored as it is named)."""

    rules: list | None = None
    shape: Callable | None = None
    combine: Callable | None = None

    def resolve(self, module_keys) -> list:
        if self.rules is not None:
            return self.rules
        return [_Same(k, [k]) for k in module_keys]

    def shape_of(self, rule, shapes):
        return shapes[0] if self.shape is None else self.shape(rule, shapes)

    def tensor_of(self, rule, tensors):
        return tensors[0] if self.combine is None else self.combine(rule, tensors)


@dataclass
class _Same:
    key: str
    sources: list


def check_header(module: torch.nn.Module, stored: dict[str, StoredTensor], what: str,
                 mapping: Mapping | None = None) -> list:
    """The stored tensors are exactly what the module needs: every key used, none missing, the
    shapes the config's, floats for floats. Returns the mapping's rules."""
    mapping = mapping or Mapping()
    expected = module.state_dict()
    rules = mapping.resolve(expected)
    sources = [s for rule in rules for s in rule.sources]
    missing = sorted(set(sources) - set(stored)) + sorted(set(expected) - {rule.key for rule in rules})
    unexpected = sorted(set(stored) - set(sources))
    if missing or unexpected:
        files = sorted({str(t.file) for t in stored.values()}) or ["(no weights)"]
        raise SoragenError(f"{what} weights in {', '.join(files)} do not match its config: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for rule in rules:
        parts = [stored[s] for s in rule.sources]
        shape, want = mapping.shape_of(rule, [t.shape for t in parts]), tuple(expected[rule.key].shape)
        if shape != want:
            raise SoragenError(f"{what} weight {rule.key} from {', '.join(rule.sources)} in {parts[0].file} has "
                               f"shape {shape}, its config wants {want}")
        for name, tensor in zip(rule.sources, parts):
            if expected[rule.key].is_floating_point() and tensor.dtype not in ("F64", "F32", "F16", "BF16"):
                raise SoragenError(f"{what} weight {name} in {tensor.file} is stored as {tensor.dtype}, "
                                   f"not as floats")
    return rules


def load_into(module: torch.nn.Module, files: list[Path], what: str, mapping: Mapping | None = None) -> None:
    """Load weights into `module` with strict key, shape and dtype checks from the headers, then a
    finiteness check per tensor, one file at a time: a tensor made of several stored ones (fused
    projections) is made when the last of them has been read. A module built on the meta device
    (no random init first) is given copies of the loaded tensors, in its own dtypes."""
    from safetensors import SafetensorError, safe_open

    mapping = mapping or Mapping()
    stored = read_header(files)
    rules = check_header(module, stored, what, mapping)
    expected = module.state_dict()
    on_meta = any(t.is_meta for t in expected.values())
    waiting = {s: rule for rule in rules for s in rule.sources}
    read: dict[str, torch.Tensor] = {}
    for file in files:
        part: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise SoragenError(f"{what} weight {name} in {file} holds NaN or infinite values")
                    rule = waiting[name]
                    # copy: a loaded tensor is a private map of the file; a weight must not depend on it
                    read[name] = tensor.to(expected[rule.key].dtype, copy=True) if on_meta else tensor
                    if all(s in read for s in rule.sources):
                        part[rule.key] = mapping.tensor_of(rule, [read.pop(s) for s in rule.sources])
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
