"""The training loop, the same for the DiT and the VAE, in one process, under DDP or under FSDP:
AdamW (float32 or 8-bit moments: soragen.train.optimizers) with linear warm-up, gradient
accumulation and clipping, an EMA of the weights, bf16 autocast where the hardware does bf16 fast,
non-finite steps skipped, checkpoints and exact resume.

Step s trains on a global batch of batch_size x grad_accum x processes clips: positions
s G .. s G + G - 1 of the endless sequence of per-epoch shuffles (epoch e's order seeded by (seed,
e)). Micro-batch m of process r takes the clips at (m x processes + r) x batch_size onwards of
it, and each clip draws its window, caption dropout, noise and noise level from generators seeded
by (seed, s, its index in the global batch) (soragen.diffusion.draws). Each micro-batch's loss is
the mean of its clips', divided by grad_accum, and the processes average their gradients: the
step's gradient is the global batch's mean loss's, however the batch is split. So 1 process x 4
clips, 2 x 2 and 1 x 2 with 2 accumulation steps train the same run (up to float rounding), and a
run resumes on another process count (soragen.train.run keeps its global batch). Randomness is
derived, not stored: the training state is just weights, optimizer moments, EMA and the step, and
a run stopped at N and resumed to 2N ends bitwise equal to one run straight to 2N (on CPU, same
split).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from soragen.core.atomic import atomic_path
from soragen.core.config import TrainConfig, to_dict
from soragen.core.errors import SoragenError, UsageError
from soragen.core.progress import MESSAGE, Progress
from soragen.diffusion.draws import ClipDraws
from soragen.train import optimizers
from soragen.train.parallel import Dist, Replicated, Sharded

MAX_BAD_STEPS_IN_A_ROW = 20



def sample_indices(num_items: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start+count-1 of the endless sequence of per-epoch shuffles of range(num_items)."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_items)
        order = list(range(num_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


def split_batch(cfg: TrainConfig, saved_world: int, world: int) -> TrainConfig:
    """cfg (saved by a run on `saved_world` processes) for a run on `world` processes with the same
    global batch: the micro-batch as large as it was or the largest that divides what each process
    now takes, and as many accumulation steps as that needs. UsageError where the global batch does
    not split into `world` equal parts."""
    total = cfg.batch_size * cfg.grad_accum * saved_world
    if world == saved_world:
        return cfg
    if total % world:
        raise UsageError(f"cannot resume this run on {world} processes: its global batch of {total} clips "
                         f"({saved_world} processes x --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}) "
                         f"does not split into {world} equal parts")
    each = total // world
    batch = max(b for b in range(1, min(cfg.batch_size, each) + 1) if each % b == 0)
    return dataclasses.replace(cfg, batch_size=batch, grad_accum=each // batch)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step `step` (0-based): linear warm-up, then constant or a cosine to 0 at
    max_steps. A function of the step alone, so resuming keeps it (a cosine run resumed with a larger
    --max-steps stretches what is left of its curve)."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr * warm


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    from soragen.models.fast_paths import has_fast_bf16
    if mode == "no":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if has_fast_bf16() else None


def train_loop(task, cfg: TrainConfig, run_dir: Path, dist: Dist, resume_from: Path | None,
               progress: Progress | None, fsdp: bool = False) -> dict:
    """Train `task` (soragen.train.tasks) to cfg.max_steps: for each step its learning rate, the
    micro-batches, clipping, the optimizer step and the EMA, a metrics line, a checkpoint."""
    amp = autocast_dtype(cfg.mixed_precision, dist.device)
    held = (Sharded if fsdp else Replicated)(task, dist, amp)
    optimizer = optimizers.build(cfg.optimizer, held.trained, cfg.lr, cfg.weight_decay)
    state = held.load(resume_from, optimizer) if resume_from is not None else {}
    step, skipped = state.get("step", 0), state.get("skipped_nonfinite", 0)
    log = MetricsLog(run_dir / "metrics.jsonl", step, cfg.max_steps, dist.main, progress)
    bad_in_a_row, loss_value = 0, float("nan")
    while step < cfg.max_steps:
        lr = learning_rate(cfg, step)
        optimizers.set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            total += micro_batch(task, held.model, cfg, dist, step, micro, amp)
        total = dist.mean(total)  # the global batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(held.trained, cfg.max_grad_norm)
        finite = dist.all_agree(math.isfinite(total) and bool(torch.isfinite(grad_norm)))
        step += 1
        if finite:
            optimizer.step()
            held.update_ema(1 - min(cfg.ema_decay, (1 + step) / (10 + step)))
            bad_in_a_row, loss_value = 0, total
        else:
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                raise SoragenError(f"stopped at step {step}: {bad_in_a_row} steps in a row had a non-finite loss "
                                   f"or gradient; lower --lr or check the data")
        log.step(step, total if finite else None, lr,
                 float(grad_norm) if finite else None, skipped)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            record = {"kind": task.kind, "skipped_nonfinite": skipped, "processes": dist.world,
                      "config": to_dict(cfg),
                      "objective": dataclasses.asdict(task.objective), **task.stored()}
            saved = held.save(run_dir, step, optimizer, record, cfg.keep_last)
            if saved is not None:
                task.after_save(saved, step)
                log.message(f"saved {saved}")
            dist.barrier()
    return {"step": step, "loss": loss_value, "skipped_nonfinite": skipped}


def micro_batch(task, model, cfg: TrainConfig, dist: Dist, step: int, micro: int,
                amp: torch.dtype | None) -> float:
    """Forward and backward of one micro-batch (the clips this process takes of the step's global
    batch, with their own random draws); its share of the step's loss."""
    first = (micro * dist.world + dist.rank) * cfg.batch_size  # in the step's global batch
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world
    items = sample_indices(task.num_items(), cfg.seed, step * global_batch + first, cfg.batch_size)
    draws = ClipDraws(cfg.seed, step, range(first, first + cfg.batch_size))
    with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
        loss = task.loss(model, items, draws) / cfg.grad_accum
    loss.backward()
    return loss.item()


class MetricsLog:
    """metrics.jsonl, one line a step, written by the main process alone, and the progress
    callback's step and message events."""

    def __init__(self, path: Path, step: int, max_steps: int, main: bool, progress: Progress | None):
        self.path, self.max_steps, self.main, self.progress = path, max_steps, main, progress if main else None
        self.started, self.start_step = time.perf_counter(), step
        dropped = _truncate_metrics(path, step) if main else 0  # a resumed run's log goes back to its step
        if dropped:
            self.message(f"{path}: dropped {dropped} unreadable line(s) (a write cut short); the checkpoint is intact")

    def step(self, step: int, loss: float | None, lr: float, grad_norm: float | None, skipped: int) -> None:
        if not self.main:
            return
        elapsed = time.perf_counter() - self.started
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "steps_per_s": (step - self.start_step) / max(elapsed, 1e-9), "skipped_nonfinite": skipped}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.progress is not None:
            shown = "skipped" if loss is None else f"{loss:.4f}"
            self.progress("train", step, self.max_steps, f"loss {shown}  {record['steps_per_s']:.2f} steps/s")

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress(MESSAGE, 0, 0, text)


def _truncate_metrics(path: Path, step: int) -> int:
    """On resume, drop metric lines past the checkpoint so the file tells one consistent story.
    A log is not a checkpoint: a line cut short by a crash or a full disk is dropped, not fatal.
    Returns how many unreadable lines were dropped."""
    if not path.exists():
        return 0
    keep, torn = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            record_step = record["step"]
            ok = isinstance(record_step, int)
        except (json.JSONDecodeError, TypeError, KeyError):
            ok = False
        if not ok:
            torn += bool(line.strip())
        elif record_step <= step:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
    return torn
