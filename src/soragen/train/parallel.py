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

from soragen.train import fsdp as sharded
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


def init_distributed(device: str = "auto") -> Dist:
    """Under torchrun (WORLD_SIZE set) join the process group: nccl on GPUs, gloo on CPU."""
    from soragen.pipeline import resolve_device
    world = int(os.environ.get("WORLD_SIZE", "1"))
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

    def load(self, checkpoint: Path, optimizer) -> dict:
        return load_train_state(checkpoint, self.module, self.ema, optimizer, self.task.trained)

    def save(self, run_dir: Path, step: int, optimizer, record: dict, keep_last: int) -> Path | None:
        saved = None
        if self.dist.main:
            saved = save_checkpoint(run_dir, step, lambda folder: self.task.write_model(folder, self.ema), self.module,
                                    self.ema, optimizer, record, keep_last, self.task.trained)
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

    def load(self, checkpoint: Path, optimizer) -> dict:
        return sharded.load_train_state(checkpoint, self.module, self.ema, optimizer, set(self.task.trained(self.module)))

    def save(self, run_dir: Path, step: int, optimizer, record: dict, keep_last: int) -> Path | None:
        saved = sharded.save_checkpoint(run_dir, step, self.task.write_model, self.task.build, self.module, self.ema,
                                        optimizer, record, keep_last, self.dist, set(self.task.trained(self.module)))
        self.dist.barrier()
        return saved if self.dist.main else None
