"""FSDP2 (`soragen train --fsdp` under torchrun): the DiT's weights, gradients and optimizer state
sharded across the processes, for models that do not fit one device.

Each block is a unit (`fully_shard`), then the root: a block's weights are gathered just before it
runs and freed after. The parts of a block that the model calls before the block itself runs (its
adaLN modulation, its cross-attention's text keys and values, made once per batch for every block)
are units of their own, or they would be used still sharded. Checkpoints are sharded too
(torch.distributed.checkpoint: each process writes its shards as safetensors, with a JSON index), written under a temporary name
and renamed when complete, as every checkpoint is; rank 0 gathers the EMA into an ordinary model
folder beside them, so a sharded run's checkpoint generates like any other.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from soragen.core.atomic import publish, remove, staging, sweep

STATE = "dcp"  # train_state/dcp/: the sharded weights, EMA and optimizer state


def shard(dit, device: torch.device, amp: torch.dtype | None):
    """Shard `dit` over all processes in place: per block, then the root. With `amp`, weights are
    gathered in that dtype and gradients reduced in float32 (Wan's modulation stays float32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    # FSDP warns that these units return views; nothing adds to them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in dit.blocks:
        fully_shard(block.adaLN_modulation, mesh=mesh, mp_policy=fp32 if dit.config.fp32_modulation else policy)
        if dit.config.cross_attention:
            fully_shard(block.cross.kv, mesh=mesh, mp_policy=policy)
            if any(True for _ in block.cross.k_norm.parameters()):
                fully_shard(block.cross.k_norm, mesh=mesh, mp_policy=policy)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(dit, mesh=mesh, mp_policy=policy)
    return dit


class ShardedEMA:
    """The EMA of the trained weights as shards beside them (FSDP modules cannot be copied)."""

    def __init__(self, module: torch.nn.Module):
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.values = [p.detach().clone() for p in self.params]

    def update(self, weight: float) -> None:
        with torch.no_grad():
            for e, p in zip(self.values, self.params):
                e.lerp_(p.detach(), weight)

    def state(self) -> dict:
        return dict(zip(self.names, self.values))


def _full_state(module, ema: ShardedEMA | None) -> dict:
    """Every process takes part; rank 0 gets the whole state dict on the CPU (with the EMA's values
    for the trained weights), the others an empty one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if ema is None:
        return get_model_state_dict(module, options=options)
    with torch.no_grad():
        kept = [p.detach().clone() for p in ema.params]
        for p, e in zip(ema.params, ema.values):
            p.copy_(e)
        try:
            return get_model_state_dict(module, options=options)
        finally:
            for p, k in zip(ema.params, kept):
                p.copy_(k)


def plain_copy(module, build, state: dict):
    """An ordinary module (made by `build()` on the meta device) holding `state`."""
    with torch.device("meta"):
        plain = build()
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval().requires_grad_(False)


def save_checkpoint(run_dir: Path, step: int, write_model, build, module, ema: ShardedEMA, optimizer,
                    record: dict, keep_last: int, dist, trained: set[str]) -> Path | None:
    """checkpoint-STEP/ of a sharded run: rank 0's model folder (the gathered EMA) + train_state/
    (state.json, and dcp/ written by every process), complete before it gets its name."""
    import torch.distributed.checkpoint as dcp

    from soragen.train.checkpoints import prune
    final = run_dir / f"checkpoint-{step}"
    names = [str(staging(final))] if dist.main else [None]
    torch.distributed.broadcast_object_list(names, src=0)  # rank 0's temporary name, for every process
    folder = Path(names[0])
    full = _full_state(module, ema)
    if dist.main:
        sweep(run_dir)
        remove(folder)
        write_model(folder, plain_copy(module, build, full))
        (folder / "train_state").mkdir()
    del full
    dist.barrier()
    dcp.save(_tensors(module, ema, optimizer, trained), storage_writer=_writer(folder / "train_state" / STATE))
    dist.barrier()
    if dist.main:
        (folder / "train_state" / "state.json").write_text(json.dumps({"step": step, **record, "sharded": dist.world},
                                                                       indent=2) + "\n")
        publish(folder, final)
        prune(run_dir, keep_last)
    dist.barrier()
    return final


def load_train_state(checkpoint: Path, module, ema: ShardedEMA, optimizer, trained: set[str]) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from soragen.train.checkpoints import _damaged, _state_json
    state = _state_json(checkpoint, "state.json")
    if not state.get("sharded"):
        raise _damaged(checkpoint, f"cannot resume {checkpoint} with --fsdp: it was saved by an unsharded run "
                                   f"(train it on with --init {checkpoint} instead)")
    saved = _tensors(module, ema, optimizer, trained)
    try:
        dcp.load(saved, storage_reader=HuggingFaceStorageReader(str(checkpoint / "train_state" / STATE)))
    except Exception as err:  # torch.distributed.checkpoint raises CheckpointException and others
        raise _damaged(checkpoint, f"cannot resume: the sharded state in {checkpoint / 'train_state'} does not "
                                   f"load ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})") from err
    set_model_state_dict(module, saved["model"], options=StateDictOptions(strict=False))  # what trains
    groups = get_optimizer_state_dict(module, optimizer)["param_groups"]  # this run's settings, the loaded moments
    set_optimizer_state_dict(module, optimizer, {"state": saved["optimizer"], "param_groups": groups})
    return state


def _tensors(module, ema: ShardedEMA, optimizer, trained: set[str]) -> dict:
    """What a sharded checkpoint keeps: the weights training changes (all, or a LoRA's), their EMA
    and the optimizer's moments; tensors only (the optimizer's settings come from the run's config),
    so that it is safetensors throughout and nothing in it is unpickled."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    weights = {k: v for k, v in get_model_state_dict(module).items() if k in trained}
    return {"model": weights, "ema": ema.state(), "optimizer": get_optimizer_state_dict(module, optimizer)["state"]}


def _writer(path: Path):
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    return HuggingFaceStorageWriter(str(path), save_distributed=True)
