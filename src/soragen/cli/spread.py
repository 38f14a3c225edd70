"""`soragen generate --prompts FILE` under torchrun: each process makes its share of the videos
(prompt i goes to process i mod N, with the seed it has in one process, so the videos are the ones
one process makes), writes them itself, each under a temporary name until whole; then rank 0
gathers what every process wrote (over a gloo group) and writes the one index.jsonl. No file is
written by two processes. A process that crashes takes the group down (torchrun stops the others),
and every video finished before is whole; the index is written only when all are done.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from soragen.core.runtime import world_size

# Processes that finished their share wait in the gather for the slowest; round robin keeps that
# to about one video, and one video of a large model can outlast gloo's default 30 minutes.
GATHER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class Spread:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls) -> "Spread":
        """Under torchrun (WORLD_SIZE set): this process's rank, its GPU (LOCAL_RANK) where there are
        GPUs, and a gloo group for the gather; else one process."""
        world = world_size()
        if world == 1:
            return cls()
        import torch
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=GATHER_TIMEOUT)
        return cls(rank, world)

    def share(self, jobs: list) -> list[tuple[int, object]]:
        """(i, job) for this process's jobs of `jobs`."""
        return [(i, job) for i, job in enumerate(jobs) if i % self.world == self.rank]

    def gather(self, records: list[tuple[int, dict]]) -> list[dict] | None:
        """Every process's (i, record), in the order of i, on rank 0; None on the others."""
        if self.world == 1:
            return [record for _, record in sorted(records, key=lambda pair: pair[0])]
        import torch
        parts = [None] * self.world if self.main else None
        torch.distributed.gather_object(records, parts, dst=0)
        torch.distributed.destroy_process_group()
        if not self.main:
            return None
        return [record for _, record in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]
