"""How the trained module is held: in one process, replicated by DDP, or sharded by FSDP. The one
seam between the training loop and the ways of splitting it: each holder wraps the module, keeps
its EMA, and saves and loads its checkpoints; the loop is the same for all three.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from soragen.core.weights import assert_finite
from soragen.core.runtime import world_size
from soragen.train import fsdp as sharded
from soragen.train import legacy_state, train_state
from soragen.train.checkpoints import load_train_state, save_checkpoint


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_agree(self, flag: bool) -> bool:
        """True where every process's `flag` is: one that skips a step must not fall out of step."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def mean(self, value: float) -> float:
        """The mean of every process's `value`."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / self.world


def init_distributed(device: str = "auto") -> Dist:
    """Under torchrun (WORLD_SIZE set) join the process group: nccl on GPUs, gloo on CPU."""
    from soragen.pipeline import resolve_device
    world = world_size()
    use_cuda = resolve_device(device).type == "cuda"
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Dist(rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


class Replicated:
    """One process, or DDP: every process holds the whole module; the EMA is a copy of what trains
    (a LoRA's base model is shared with it, not copied), and rank 0 writes the checkpoints."""

    def __init__(self, task, dist: Dist, amp: torch.dtype | None):
        self.task, self.dist = task, dist
        self.module = task.module.to(dist.device)
        self.trained = [p for p in self.module.parameters() if p.requires_grad]
        frozen = {id(p): p for p in self.module.parameters() if not p.requires_grad}
        self.ema = copy.deepcopy(self.module, memo=frozen).eval().requires_grad_(False)
        self.ema_pairs = [(e, p) for e, p in zip(self.ema.parameters(), self.module.parameters()) if p.requires_grad]
        self.model = torch.nn.parallel.DistributedDataParallel(self.module) if dist.world > 1 else self.module

    def update_ema(self, weight: float) -> None:
        with torch.no_grad():
            for e, p in self.ema_pairs:
                e.lerp_(p.detach(), weight)

    def tensors(self, optimizer) -> dict:
        """What train_state/dcp/ keeps: the tensors training changes (all, or a LoRA's), the EMA of
        the trained weights, the optimizer's moments."""
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        ema = dict(self.ema.named_parameters())
        return {"model": self.task.trained(self.module), "ema": {n: ema[n] for n in names},
                "optimizer": train_state.optimizer_state(self.module, optimizer)}

    def load(self, checkpoint: Path, optimizer) -> dict:
        def legacy(state_dir: Path) -> None:
            legacy_state.load(state_dir, self.module, self.ema, optimizer, self.task.trained)
        state, saved = load_train_state(checkpoint, lambda: self.tensors(optimizer), self.dist, legacy=legacy)
        if saved is not None:  # the weights and the EMA were filled in place
            train_state.restore_optimizer(self.module, optimizer, saved["optimizer"])
        return state

    def save(self, run_dir: Path, step: int, optimizer, record: dict, keep_last: int) -> Path | None:
        if self.dist.main:
            assert_finite(self.module, "the model")
            assert_finite(self.ema, "the EMA model")
        saved = save_checkpoint(run_dir, step, lambda folder: self.task.write_model(folder, self.ema),
                                lambda: self.tensors(optimizer), record, keep_last, self.dist)
        self.dist.barrier()
        return saved


class Sharded:
    """FSDP2: each process holds its shards of the weights, their EMA and the optimizer state, and
    writes them; rank 0 gathers the EMA into the checkpoint's model folder (soragen.train.fsdp)."""

    def __init__(self, task, dist: Dist, amp: torch.dtype | None):
        self.task, self.dist = task, dist
        self.module = sharded.shard(task.module.to(dist.device), dist.device, amp)
        self.trained = [p for p in self.module.parameters() if p.requires_grad]
        self.ema = sharded.ShardedEMA(self.module)
        self.model = self.module

    def update_ema(self, weight: float) -> None:
        self.ema.update(weight)

    def tensors(self, optimizer) -> dict:
        """As Replicated's, each process's shards of them."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        trained = set(self.task.trained(self.module))
        return {"model": {k: v for k, v in get_model_state_dict(self.module).items() if k in trained},
                "ema": self.ema.state(), "optimizer": train_state.optimizer_state(self.module, optimizer)}

    def write_model(self, folder: Path) -> None:
        """Every process gathers the EMA's weights; rank 0 writes them as an ordinary model folder."""
        full = sharded.full_state(self.module, self.ema)
        if self.dist.main:
            self.task.write_model(folder, sharded.plain_copy(self.task.build, full))

    def load(self, checkpoint: Path, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        state, saved = load_train_state(checkpoint, lambda: self.tensors(optimizer), self.dist, sharded=True)
        set_model_state_dict(self.module, saved["model"], options=StateDictOptions(strict=False))  # what trains
        train_state.restore_optimizer(self.module, optimizer, saved["optimizer"])
        return state

    def save(self, run_dir: Path, step: int, optimizer, record: dict, keep_last: int) -> Path | None:
        saved = save_checkpoint(run_dir, step, self.write_model, lambda: self.tensors(optimizer), record, keep_last,
                                self.dist, every_process=True)
        self.dist.barrier()
        return saved
