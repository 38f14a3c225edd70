"""A checkpoint's training state, train_state/dcp/: the weights training changes, their EMA and the
optimizer's moments, written and read by torch.distributed.checkpoint as safetensors, the same way
in one process, under DDP (rank 0 writes alone) and under FSDP (every process writes its shards).

    write(folder / "dcp", {"model": ..., "ema": ..., "optimizer": ...}, alone=True)
    listing(folder / "dcp")   # {"shard-00001-model-00001-of-00001.safetensors": {"model.x": [3, 4], ...}}

One safetensors file per process that writes (DCP's HuggingFaceStorageWriter, each file's header
holding where its shards sit in the whole tensors), and nothing else: no pickled .metadata is
written, and reading takes the layout from the files' headers (HuggingFaceStorageReader), so
nothing is unpickled. Tensors only: the optimizer's settings come from the run's stored config.
The listing of what each file holds goes into state.json, so a checkpoint's files are checked by
their headers alone before a run starts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from soragen.core.errors import SoragenError

DIR = "dcp"
# torch.distributed.checkpoint says so each time it saves or loads in one process
_ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"


def whole(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a run trains by default: all of the module."""
    return module.state_dict()


def flat(tensors: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A nested dict of tensors by the names torch.distributed.checkpoint stores them under."""
    out = {}
    for key, value in tensors.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write(folder: Path, tensors: dict, alone: bool) -> None:
    """`tensors` (nested dicts of tensors) into `folder`: every process of the group takes part, or
    with `alone` this one process by itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    others = [name for name, value in flat(tensors).items() if not torch.is_tensor(value)]
    if others:  # torch.distributed.checkpoint would pickle them
        raise SoragenError(f"the training state holds values that are not tensors, e.g. {others[0]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True), no_dist=alone)


def listing(folder: Path) -> dict[str, dict[str, list[int]]]:
    """What each file of `folder` holds, from the headers: {file name: {tensor name: shape}}."""
    from soragen.core.weights import read_header
    return {file.name: {name: list(t.shape) for name, t in sorted(read_header([file]).items())}
            for file in sorted(folder.glob("*.safetensors"))}


def record_json(record: dict, listed: dict) -> str:
    """state.json's text: `record` indented, then `listed` (listing's) under "dcp", a tensor a line."""
    files = [f"    {json.dumps(file)}: {{\n" + ",\n".join(f"      {json.dumps(name)}: {json.dumps(shape)}"
                                               for name, shape in tensors.items()) + "\n    }"
             for file, tensors in listed.items()]
    return json.dumps(record, indent=2)[:-2] + f',\n  "{DIR}": {{\n' + ",\n".join(files) + "\n  }\n}\n"


def check(folder: Path, listed, state_file: Path) -> None:
    """SoragenError naming the first file of `folder` that is missing, unlisted or does not hold
    what `listed` (state.json's listing) says. Headers only."""
    if not isinstance(listed, dict) or not listed or not all(isinstance(v, dict) for v in listed.values()):
        raise SoragenError(f"{state_file} is damaged: its listing of {folder.name}/ is not one of files")
    for name in listed:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise SoragenError(f"{state_file} is damaged: it lists {name[:60]!r} in {folder.name}/")
        if not (folder / name).exists():
            raise SoragenError(f"{folder / name} is missing")
    found = listing(folder)
    unlisted = sorted(set(found) - set(listed))
    if unlisted:
        raise SoragenError(f"{folder / unlisted[0]} is not one of the files its state.json lists")
    for name, tensors in listed.items():
        wrong = sorted(k for k in set(tensors) | set(found[name]) if tensors.get(k) != found[name].get(k))
        if wrong:
            raise SoragenError(f"{folder / name} does not hold what its state.json lists ({len(wrong)} tensors "
                               f"missing, unlisted or of another shape, e.g. {wrong[0]})")


def load(folder: Path, tensors: dict, alone: bool) -> str | None:
    """Read `folder` into `tensors` (nested dicts of this run's tensors, filled in place), after
    checking from the headers that it holds each of them, in its shape and dtype. ValueError for
    what does not fit; returns the name of a tensor that holds NaN or infinity (in this process's
    part of it), or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from soragen.core.weights import finite
    wanted = flat(tensors)
    stored = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or extra:
        raise ValueError(f"it holds {len(extra)} tensors this run does not have and lacks {len(missing)} it has, "
                         f"e.g. {(missing or extra)[0]}")
    for name, tensor in wanted.items():
        if tuple(stored[name].size) != tuple(tensor.shape):
            raise ValueError(f"{name} has shape {tuple(stored[name].size)}, this run's {tuple(tensor.shape)}")
        if stored[name].properties.dtype != tensor.dtype:
            raise ValueError(f"{name} is {stored[name].properties.dtype}, this run's {tensor.dtype}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=alone)
    for name, tensor in flat(tensors).items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not finite(local):
            return name
    return None


def optimizer_state(module: torch.nn.Module, optimizer) -> dict:
    """The optimizer's moments by parameter name (a new optimizer's made, at zero). A moment held as
    a tensor subclass (torchao's 8-bit ones: codes, scale, qmap) is given as its plain parts, e.g.
    {"exp_avg": {"codes": uint8, "scale": float32, "qmap": float32}}: the optimizer's own tensors,
    so loading into them in place loads the moment."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(module, optimizer)["state"]
    return {name: {key: _parts(value) for key, value in entry.items()} for name, entry in state.items()}


def restore_optimizer(module: torch.nn.Module, optimizer, state: dict) -> None:
    """The moments loaded into `optimizer` (parts put back together as the optimizer holds them);
    its settings (lr, betas, ...) stay this run's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    current = get_optimizer_state_dict(module, optimizer)
    whole = {name: {key: _joined(value, current["state"][name][key]) for key, value in entry.items()}
             for name, entry in state.items()}
    set_optimizer_state_dict(module, optimizer, {"state": whole, "param_groups": current["param_groups"]})


def _subclass(value) -> bool:
    """A tensor subclass made of plain tensors (not a DTensor: torch.distributed.checkpoint stores
    those itself, as shards)."""
    from torch.distributed.tensor import DTensor
    return torch.is_tensor(value) and type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__") \
        and not isinstance(value, DTensor)


def _parts(value):
    if not _subclass(value):
        return value
    names, _ = value.__tensor_flatten__()
    return {name: getattr(value, name) for name in names}


def _joined(value, like):
    """`value` (parts of a moment, or a tensor) as `like` (this run's moment) holds it."""
    if not isinstance(value, dict):
        return value
    _, attributes = like.__tensor_flatten__()
    return type(like).__tensor_unflatten__(value, attributes, like.shape, like.stride())
