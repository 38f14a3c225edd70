"""Safetensors in and out, strictly: every key must match, every shape must be the config's and
every weight must be finite. Nothing here unpickles anything.

Loading reads the files' headers first (names, shapes, dtypes; no tensor data), checks them
against the module, and only then reads the tensors, one file at a time, so a folder whose config
does not fit its weights fails at once, and a sharded checkpoint never sits in memory twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from soragen.core.atomic import atomic_path
from soragen.core.errors import SoragenError


@dataclass
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", "I64", ...


def _invalid(file: Path, err: BaseException) -> SoragenError:
    return SoragenError(f"{file} is not a valid safetensors file (truncated, or another format renamed?): "
                        f"{(str(err).splitlines() or [type(err).__name__])[0]}")


def _check_regular(file: Path) -> None:
    from soragen.core.jsonfile import not_regular
    kind = not_regular(file)
    if kind:
        raise SoragenError(f"weights file {file} is {kind}, not a regular file")
    if not file.is_file():
        raise SoragenError(f"missing weights file {file}")


def weight_files(folder: Path, what: str) -> list[Path]:
    """A folder's safetensors: the files its *.safetensors.index.json names, or every *.safetensors."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        from soragen.core.jsonfile import read_json
        data = read_json(index[0])
        try:
            names = sorted(set(data["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as err:
            raise SoragenError(f"{index[0]} is not a safetensors index (a JSON object with a weight_map): "
                               f"{err!r}") from err
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
        _check_regular(file)
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
        _check_regular(file)
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _invalid(file, err) from err
    return state


@dataclass
class Mapping:
    """How stored tensors become a module's: `rules` are (our key, source keys, combine), with
    `shape(rule, source shapes)` and `combine(rule, source tensors)` (soragen.families.wan's key map), or
    None for the identity (each key stored as it is named)."""

    rules: list | None = None
    shape: Callable | None = None
    combine: Callable | None = None
    rows: Callable | None = None  # (rule, source shapes) -> the rows of our weight each source fills, or None

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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _entries(file: Path) -> tuple[int, list[tuple[str, dict]]]:
    """(where the data starts, [(name, header entry)] in file order) of a safetensors file, with
    every entry's offsets checked against its shape and the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 0 < header_len <= min(size - 8, 100 << 20):
            raise ValueError(f"header length {header_len} does not fit the file ({size} bytes)")
        header = json.loads(f.read(header_len))
    start = 8 + header_len
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda e: e[1]["data_offsets"][0])
    for name, entry in entries:
        dtype, (begin, end) = _DTYPES.get(entry["dtype"]), entry["data_offsets"]
        if dtype is None:
            raise ValueError(f"tensor {name} has dtype {entry['dtype']}, which soragen does not read")
        if not (0 <= begin <= end <= size - start and end - begin == math.prod(entry["shape"]) * dtype.itemsize):
            raise ValueError(f"tensor {name}'s offsets {begin}..{end} do not fit its shape or the file")
    return start, entries


def finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in t. A NaN or infinity makes the sum one too, and summing is several
    times faster than torch.isfinite, so only a weight whose sum is not finite (or overflows) is
    looked at element by element, a slice at a time: a mask of a whole weight per weight would
    leave the heap scattered with freed masks between the weights kept."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    flat = t.reshape(-1)
    step = 1 << 20
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def _read_into(f, start: int, entry: dict, dest: torch.Tensor) -> None:
    """Read one stored tensor into `dest` (contiguous, of its shape): straight from the file where
    the dtypes agree, through one tensor-sized buffer where they do not."""
    dtype, (begin, end) = _DTYPES[entry["dtype"]], entry["data_offsets"]
    f.seek(start + begin)
    if dest.dtype == dtype and dest.is_contiguous():
        if end > begin:
            f.readinto(memoryview(dest.view(torch.uint8).reshape(-1).numpy()))
        return
    data = bytearray(f.read(end - begin))
    dest.copy_(torch.frombuffer(data, dtype=dtype).reshape(dest.shape) if end > begin else dest)


def load_into(module: torch.nn.Module, files: list[Path], what: str, mapping: Mapping | None = None,
              keep: Callable[[str], bool] | None = None) -> None:
    """Load weights into `module` with strict key, shape and dtype checks from the headers, then a
    finiteness check per tensor, one file and one tensor at a time. Each weight is made once in its
    own dtype and the file read into it (the parts of a fused projection into their rows), so
    loading holds the model and at most a tensor more, never a mapped shard. A module built on the
    meta device (no random init first) takes these tensors as its weights. `keep(name)` False: a
    stored tensor that is not the module's (a VAE's encoder, for its decoder alone), never read."""
    mapping = mapping or Mapping()
    stored = {name: t for name, t in read_header(files).items() if keep is None or keep(name)}
    rules = check_header(module, stored, what, mapping)
    expected = module.state_dict()
    on_meta = any(t.is_meta for t in expected.values())
    where = {}  # source -> (rule, rows of the weight it fills, or None: read whole, combined after)
    for rule in rules:
        shapes = [stored[s].shape for s in rule.sources]
        rows = mapping.rows(rule, shapes) if mapping.rows else [slice(None)] * len(shapes)
        for source, part in zip(rule.sources, rows or [None] * len(shapes)):
            where[source] = (rule, part)
    by_key = {rule.key: rule for rule in rules}
    made: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}  # sources read whole, for a rule combined after
    for count, file in enumerate(files, 1):
        try:
            start, entries = _entries(file)
            with open(file, "rb") as f:
                for name, entry in entries:
                    if name not in stored:
                        continue
                    rule, part = where[name]
                    target = expected[rule.key]
                    if part is None:
                        buf = torch.empty(entry["shape"], dtype=target.dtype)
                        _read_into(f, start, entry, buf)
                        region, pending[name] = buf, buf
                    else:
                        if rule.key not in made:
                            made[rule.key] = torch.empty(target.shape, dtype=target.dtype)
                        region = made[rule.key][part]
                        _read_into(f, start, entry, region)
                    if region.is_floating_point() and not finite(region):
                        raise SoragenError(f"{what} weight {name} in {file} holds NaN or infinite values")
                    if part is None and all(s in pending for s in rule.sources):
                        made[rule.key] = mapping.tensor_of(rule, [pending.pop(s) for s in rule.sources])
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
            raise _invalid(file, err) from err
        read_so_far = set(files[:count])
        done = {k: t for k, t in made.items() if all(stored[s].file in read_so_far for s in by_key[k].sources)}
        module.load_state_dict(done, strict=False, assign=on_meta)
        for k in done:
            del made[k]


def assert_finite(module: torch.nn.Module, what: str) -> None:
    check_finite(module.state_dict(), what)


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """SoragenError naming the first floating-point tensor of `state` that holds NaN or infinity."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not finite(tensor):
            raise SoragenError(f"refusing to save {what}: weight {name} holds NaN or infinite values")


def save_module(module: torch.nn.Module, path: Path, what: str, dtype: torch.dtype | None = None) -> None:
    """Write a module's weights as safetensors (contiguous CPU copies), via a temporary file.
    `dtype` stores floating-point weights in another precision (bf16 halves a shipped model)."""
    save_tensors(module.state_dict(), path, what, dtype)


def save_tensors(state: dict[str, torch.Tensor], path: Path, what: str, dtype: torch.dtype | None = None) -> None:
    """save_module's file from tensors by name."""
    from safetensors.torch import save_file

    check_finite(state, what)
    state = {k: v.detach().to("cpu", dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
