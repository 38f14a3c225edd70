"""Training: the DiT on cached VAE latents (`soragen train`) and the VAE itself (`soragen train-vae`).

Both share one loop: AdamW with linear warm-up, gradient accumulation and clipping, an EMA of the
weights, bf16 autocast where the hardware does bf16 fast, non-finite steps skipped, checkpoints
(soragen.train.checkpoints), exact resume, and DDP under torchrun. What is minimised is in
soragen.diffusion.objectives; the DiT's examples come from soragen.train.latent_cache.

Randomness is derived, not stored: step s on rank r draws its noise, timesteps, caption dropout
and crops from a generator seeded with (seed, r, s), and the data order of epoch e from
(seed, e). So the training state is just weights, optimizer moments, EMA and the step, and a run
stopped at N and resumed to 2N ends bitwise equal to one run straight to 2N (on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soragen.core.atomic import atomic_path
from soragen.train.checkpoints import (load_train_state, prepare_run_dir, resumable, save_checkpoint, stored_lora,
                                 stored_run, whole)
from soragen.core.config import (DiTObjective, LoRAConfig, SamplingDefaults, TextEncoderSpec, TrainConfig, VAEObjective,
                            VideoDefaults, dit_preset, vae_preset_config)
from soragen.train.data import Clip, load_clip, require_clips, scan_clips
from soragen.core.errors import SoragenError, UsageError
from soragen.core.options import check_multiple, option_error
from soragen.train.latent_cache import LatentSamples, build_samples
from soragen.models.lora import add_lora, trainable_state
from soragen.io.folders import latest_checkpoint
from soragen.families.registry import DEFAULT
from soragen.io.model_folder import family, load_model, read_manifest, save_lora_model, save_model
from soragen.diffusion.objectives import VAEWithLoss, diffusion_loss, flow_loss
from soragen.diffusion.sampling import is_flow
from soragen.models.vae import VideoVAE, load_vae, new_vae, save_vae, uint8_to_frames

MAX_BAD_STEPS_IN_A_ROW = 20

# progress(event, info): events "scan" (done, total), "cache" (done, total), "step" (dict of metrics),
# "message" (str). The CLI turns them into bars and lines; rank > 0 gets None.
Progress = Callable[[str, object], None]


# ---- distributed -------------------------------------------------------------------------------

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


def init_distributed(device: str = "auto") -> Dist:
    """Under torchrun (WORLD_SIZE set) join the process group: nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from soragen.pipeline import resolve_device
    use_cuda = resolve_device(device).type == "cuda"
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Dist(rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:8], "little")
    return torch.Generator("cpu").manual_seed(mixed)


def sample_indices(num_items: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start+count-1 of the endless sequence of per-epoch shuffles of range(num_items)."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_items)
        order = list(range(num_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


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


# ---- what differs between DiT and VAE training -------------------------------------------------

class Task:
    """One kind of training: the trainable module, how a micro-batch's loss is computed, and
    what a checkpoint holds besides the training state."""

    kind: str
    module: torch.nn.Module
    trained = staticmethod(whole)  # the tensors training changes, which train_state/ keeps

    def loss(self, module: torch.nn.Module, items: list[int], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def num_items(self) -> int:
        raise NotImplementedError

    def write_model(self, folder: Path, ema: torch.nn.Module) -> None:
        raise NotImplementedError

    def after_save(self, folder: Path, ema: torch.nn.Module, step: int) -> None:
        pass

    def stored(self) -> dict:
        """What state.json keeps of this run besides its config and objective."""
        return {}


class DiTTask(Task):
    kind = "dit"

    def __init__(self, dit, start: "Start", video: VideoDefaults, samples: LatentSamples, caption_dropout: float,
                 objective: DiTObjective, lora: LoRAConfig):
        from soragen.diffusion.sampling import training_scheduler
        self.module, self.vae, self.text_spec, self.video = dit, start.vae, start.text_spec, video
        self.samples, self.caption_dropout, self.objective = samples, caption_dropout, objective
        self.sampling = start.sampling  # None: the generic defaults; with --init, the tuned ones of that model
        self.lora, self.base, self.family = lora, start.base_ref, start.family
        self.scheduler_config = objective.schedule(start.schedule if is_flow(start.schedule) else None)
        self.scheduler = None if objective.prediction == "flow" else training_scheduler(self.scheduler_config)
        if lora.lora_rank:
            self.trained = trainable_state
        self.sample_hook: Callable[[Path, int], None] | None = None

    def num_items(self) -> int:
        return len(self.samples)

    def loss(self, module, items, generator):
        latents, text = self.samples.batch(items, generator, self.caption_dropout)
        device = next(module.parameters()).device
        latents, text = latents.to(device), text.to(device, torch.float32)
        if self.scheduler is None:
            return flow_loss(module, self.scheduler_config, latents, text, generator, self.objective.object_weight)
        return diffusion_loss(module, self.scheduler, latents, text, generator, self.objective.object_weight)

    def stored(self) -> dict:
        return {"lora": dataclasses.asdict(self.lora)}

    def build(self):
        """A new module of the trained one's structure (an FSDP run's EMA is gathered into it)."""
        from soragen.models.dit import VideoDiT
        dit = VideoDiT(self.module.config)
        return add_lora(dit, self.lora) if self.lora.lora_rank else dit

    def write_model(self, folder, ema):
        if self.lora.lora_rank:
            save_lora_model(folder, ema, self.base, self.lora, self.video, self.sampling, self.family)
        else:
            save_model(folder, ema, self.vae, self.text_spec, self.video, self.scheduler_config, self.sampling,
                       family_name=self.family.name if self.family else DEFAULT)

    def after_save(self, folder, ema, step):
        if self.sample_hook:
            self.sample_hook(folder, step)


class VAETask(Task):
    kind = "vae"

    def __init__(self, vae: VideoVAE, clips: list[Clip], cfg: TrainConfig, objective: VAEObjective):
        o = objective
        self.module = VAEWithLoss(vae.model.train().requires_grad_(True), o.kl_weight, o.sample_posterior,
                                  o.detail_weight, o.decoder_only)
        self.clips, self.frames, self.fps, self.height, self.width = clips, cfg.frames, cfg.fps, cfg.height, cfg.width
        self.crop = o.crop
        self._frames: dict[Path, np.ndarray] = {}
        self._bytes, self.memory_budget = 0, 4 << 30

    def num_items(self) -> int:
        return len(self.clips)

    def _clip(self, index: int, generator: torch.Generator) -> np.ndarray:
        """A random window of clip `index`; decoded clips stay in memory while they fit."""
        from soragen.train.data import resize_and_crop, sample_frame_indices
        from soragen.io.video import read_video
        clip = self.clips[index]
        if clip.path not in self._frames:
            frames, _ = read_video(clip.path)
            if self._bytes + frames.nbytes <= self.memory_budget:
                self._frames[clip.path] = frames
                self._bytes += frames.nbytes
        else:
            frames = self._frames[clip.path]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        rng = random.Random(seed)
        indices = sample_frame_indices(len(frames), clip.info.fps, self.frames, self.fps, rng)
        window = resize_and_crop(frames[indices], self.height, self.width)
        if self.crop:  # a random square at full scale: 1/4 of the pixels for a half-side crop, same detail
            top, left = rng.randint(0, self.height - self.crop), rng.randint(0, self.width - self.crop)
            window = window[:, top:top + self.crop, left:left + self.crop]
        return window

    def loss(self, module, items, generator):
        video = uint8_to_frames(np.stack([self._clip(i, generator) for i in items]))
        return module(video.to(next(module.parameters()).device), generator)

    @torch.no_grad()
    def latent_stats(self, model, count: int = 32) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the (un-normalised) latents of up to `count` clips."""
        zs = []
        for i in range(min(count, len(self.clips))):
            clip = load_clip(self.clips[i], self.frames, self.fps, self.height, self.width, random.Random(i))
            x = uint8_to_frames(clip).to(next(model.parameters()).device)
            zs.append(model.encode(x).latent_dist.mode().float().cpu())
        z = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in zs], dim=1)
        return z.mean(1).tolist(), z.std(1).clamp(min=1e-3).tolist()

    def write_model(self, folder, ema):
        model = copy.deepcopy(ema.vae).eval()
        mean, std = self.latent_stats(model)
        model.register_to_config(latents_mean=mean, latents_std=std)
        folder.mkdir(parents=True)
        save_vae(VideoVAE(model), folder / "vae")
        (folder / "soragen.json").write_text(json.dumps({"kind": "vae", "note": "a trained VAE: pass this run "
                                                         "or checkpoint to soragen train --vae"}, indent=2) + "\n")


# ---- the shared loop ---------------------------------------------------------------------------

def train_loop(task: Task, cfg: TrainConfig, run_dir: Path, dist: Dist, resume_from: Path | None,
               progress: Progress | None, fsdp: bool = False) -> dict:
    from soragen.train import fsdp as sharded
    module = task.module.to(dist.device)
    amp = autocast_dtype(cfg.mixed_precision, dist.device)
    if fsdp:
        sharded.shard(module, dist.device, amp)
    trained = [p for p in module.parameters() if p.requires_grad]
    if fsdp:
        ema = sharded.ShardedEMA(module)
    else:  # the EMA shares the frozen weights (a LoRA's base model): only what trains is held twice
        frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
        ema = copy.deepcopy(module, memo=frozen).eval().requires_grad_(False)
        ema_pairs = [(e, p) for e, p in zip(ema.parameters(), module.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    step, counters = 0, {"skipped_nonfinite": 0}
    if resume_from is not None:
        if fsdp:
            state = sharded.load_train_state(resume_from, module, ema, optimizer, set(task.trained(module)))
        else:
            state = load_train_state(resume_from, module, ema, optimizer, task.trained)
        step, counters = state["step"], {"skipped_nonfinite": state.get("skipped_nonfinite", 0)}
    model = module
    if dist.world > 1 and not fsdp:
        model = torch.nn.parallel.DistributedDataParallel(module)
    metrics_file = run_dir / "metrics.jsonl"
    if dist.main:
        dropped = _truncate_metrics(metrics_file, step)
        if dropped and progress:
            progress("message", f"{metrics_file}: dropped {dropped} unreadable line(s) (a write cut short); "
                                f"the checkpoint is intact")
    bad_in_a_row, started, start_step = 0, time.perf_counter(), step
    loss_value = float("nan")
    while step < cfg.max_steps:
        generator = step_generator(cfg.seed, dist.rank, step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            position = ((step * cfg.grad_accum + micro) * dist.world + dist.rank) * cfg.batch_size
            items = sample_indices(task.num_items(), cfg.seed, position, cfg.batch_size)
            with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
                loss = task.loss(model, items, generator) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
        finite = math.isfinite(total) and bool(torch.isfinite(grad_norm))
        if dist.world > 1:  # every rank must agree to skip, or DDP falls out of step
            flag = torch.tensor([float(finite)], device=dist.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item())
        step += 1
        if finite:
            optimizer.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            if fsdp:
                ema.update(1 - decay)
            else:
                with torch.no_grad():
                    for e, p in ema_pairs:
                        e.lerp_(p.detach(), 1 - decay)
            bad_in_a_row, loss_value = 0, total
        else:
            counters["skipped_nonfinite"] += 1
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                raise SoragenError(f"stopped at step {step}: {bad_in_a_row} steps in a row had a non-finite loss "
                                   f"or gradient; lower --lr or check the data")
        if dist.main:
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": total if finite else None, "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": float(grad_norm) if finite else None,
                      "steps_per_s": (step - start_step) / max(elapsed, 1e-9),
                      "skipped_nonfinite": counters["skipped_nonfinite"]}
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if progress:
                progress("step", record)
        if (step % cfg.save_every == 0 or step == cfg.max_steps) and fsdp:
            record = {"kind": task.kind, **counters, "config": dataclasses.asdict(cfg),
                      "objective": dataclasses.asdict(task.objective), **task.stored()}
            ckpt = sharded.save_checkpoint(run_dir, step, task.write_model, task.build, module, ema, optimizer,
                                           record, cfg.keep_last, dist, set(task.trained(module)))
            if dist.main:
                task.after_save(ckpt, None, step)
                if progress:
                    progress("message", f"saved {ckpt}")
            dist.barrier()
        elif step % cfg.save_every == 0 or step == cfg.max_steps:
            if dist.main:
                record = {"kind": task.kind, **counters, "config": dataclasses.asdict(cfg),
                          "objective": dataclasses.asdict(task.objective), **task.stored()}
                ckpt = save_checkpoint(run_dir, step, lambda folder: task.write_model(folder, ema), module, ema,
                                       optimizer, record, cfg.keep_last, task.trained)
                task.after_save(ckpt, ema, step)
                if progress:
                    progress("message", f"saved {ckpt}")
            dist.barrier()
    return {"step": step, "loss": loss_value, **counters}


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


# ---- entry points used by the CLI --------------------------------------------------------------

def start_run(out: Path, resume: bool, cfg: TrainConfig, objective, device: str, progress: Progress | None):
    """Join the process group, pick the checkpoint to resume (rank 0 decides, the others follow),
    and on resume check it whole and take the run's stored config and objective (only --max-steps
    may change). Returns (dist, progress, checkpoint or None, cfg, objective)."""
    dist = init_distributed(device)
    progress = progress if dist.main else None
    note = (lambda line: progress("message", line)) if progress else None
    resume_from = prepare_run_dir(out, resume, note) if dist.main else (resumable(out) if resume else None)
    dist.barrier()
    if resume_from is not None:
        # a DiT run from before the objective was stored predicted the noise
        older = {"prediction": "epsilon"} if isinstance(objective, DiTObjective) else {}
        stored_cfg, objective = stored_run(resume_from, type(objective), older)
        cfg = dataclasses.replace(stored_cfg, max_steps=cfg.max_steps)
    return dist, progress, resume_from, cfg, objective


def resolve_vae(source: str) -> VideoVAE:
    """--vae: a train-vae run (its latest checkpoint), a checkpoint, a model folder, a VAE folder or a hub id."""
    path = Path(source)
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is not None:
            path = checkpoint
        return load_vae(path)
    return load_vae(source)


def check_size(cfg: TrainConfig, multiple: int) -> None:
    for name, value in (("height", cfg.height), ("width", cfg.width)):
        check_multiple(name, value, multiple)


def scan(cfg: TrainConfig, progress: Progress | None):
    report = scan_clips(Path(cfg.data), cfg.frames, cfg.fps,
                        progress=(lambda d, n: progress("scan", (d, n))) if progress else None)
    require_clips(report, cfg.data)
    if progress:
        progress("message", report.summary())
        for line in report.skipped_details():
            progress("message", "  skipped " + line)
    return report


@dataclass
class Start:
    """What a DiT run starts from: the frozen VAE and text encoder, the DiT (None: a new one of
    `dit_config`), the sampling defaults and noise schedule it keeps, and for a LoRA run the base
    model its adapter belongs to (a folder or a hub id)."""

    vae: VideoVAE
    text_spec: TextEncoderSpec
    dit: torch.nn.Module | None = None
    dit_config: object = None
    sampling: SamplingDefaults | None = None
    schedule: dict | None = None
    base_ref: str | None = None
    family: object = None  # soragen.families.base.Family of the --init model; None: soragen's own


def base_reference(init: str, model) -> str:
    """How a LoRA run names its base model: a hub id as given, a folder by its absolute path."""
    return str(Path(model.path).resolve()) if Path(init).exists() else init


def _dit_start(cfg: TrainConfig, text_source: str, vae_source: str | None, init: str | None,
               resume_from: Path | None, lora: LoRAConfig) -> Start:
    if resume_from is not None:
        manifest = read_manifest(resume_from)
        if manifest.get("kind") == "lora":  # the base model, unmerged; the adapter comes from train_state/
            base = load_model(manifest["base"])
            return Start(base.vae, base.text_spec, base.dit, base.dit.config, base.sampling, base.scheduler_config,
                         manifest["base"], family(base))
        model = load_model(resume_from)
        return Start(model.vae, model.text_spec, None, model.dit.config, model.sampling, model.scheduler_config,
                     family=family(model))
    if lora.lora_rank and not init:
        raise UsageError("--lora-rank adapts a pretrained model: give it --init (a model folder, a diffusers Wan "
                         "folder or a hub id)")
    if init:
        base = load_model(init)
        vae = base.vae
        if vae_source:  # move the DiT onto another VAE's latents, e.g. a fine-tuned one
            if lora.lora_rank:
                raise UsageError("--vae with --lora-rank: a LoRA keeps its base model's VAE")
            vae = resolve_vae(vae_source)
            if vae.latent_channels != base.dit.config.in_channels:
                raise UsageError(f"--vae {vae_source} makes {vae.latent_channels}-channel latents; the --init "
                                 f"DiT takes {base.dit.config.in_channels}")
        return Start(vae, base.text_spec, base.dit, base.dit.config, base.sampling, base.scheduler_config,
                     base_reference(init, base) if lora.lora_rank else None, family(base))
    if not vae_source:
        raise UsageError("soragen train needs a VAE: --vae RUN_DIR_OR_MODEL (train one with soragen "
                         "train-vae) or a pretrained Wan 2.1 VAE folder or hub id")
    return Start(resolve_vae(vae_source), TextEncoderSpec(source=text_source))


def resolve_objective(objective: DiTObjective, start: Start) -> DiTObjective:
    """"auto" made concrete for the model trained; an objective that cannot train it refused."""
    from soragen.core.config import ConfigError
    flow = is_flow(start.schedule)
    try:
        objective = objective.resolved(flow)
    except ConfigError as err:
        raise option_error(err) from None
    if flow and objective.prediction != "flow":
        raise UsageError(f"--prediction {objective.prediction}: this model was trained by flow matching (its "
                         f"schedule is a flow's); fine-tune it with --prediction flow")
    return objective


def run_train(cfg: TrainConfig, objective: DiTObjective, *, out: Path, preset: str = "tiny",
              text_encoder: str = "default", vae: str | None = None, init: str | None = None, resume: bool = False,
              cache_dir: Path | None = None, windows: int = 4, device: str = "auto",
              sample_prompts: list[str] = (), progress: Progress | None = None,
              lora: LoRAConfig | None = None, fsdp: bool = False) -> dict:
    """Train the DiT of a new run, an --init model's (all of it, or a LoRA on it), or a resumed run's,
    to cfg.max_steps."""
    from soragen.models import fast_paths
    from soragen.models.dit import VideoDiT
    from soragen.models.text import TextEncoder

    lora = lora or LoRAConfig()
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--fsdp shards the model across processes: start them with torchrun "
                         "(torchrun --nproc_per_node=N -m soragen train ... --fsdp)")
    dist, progress, resume_from, cfg, objective = start_run(out, resume, cfg, objective, device, progress)
    if resume_from is not None:
        lora = stored_lora(resume_from)
    start = _dit_start(cfg, text_encoder, vae, init, resume_from, lora)
    objective = resolve_objective(objective, start)
    encoder = TextEncoder(start.text_spec)
    dit_config = start.dit_config or dit_preset(preset, in_channels=start.vae.latent_channels, text_dim=encoder.dim)
    check_size(cfg, start.vae.spatial_factor * dit_config.patch_size[1])
    torch.manual_seed(cfg.seed)  # the initial weights
    dit = VideoDiT(dit_config) if start.dit is None else start.dit
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.train().requires_grad_(True)
    if lora.lora_rank:
        torch.manual_seed(cfg.seed)  # the adapter's initial A
        add_lora(dit, lora)

    report = scan(cfg, progress)
    fast_paths.install(start.vae.model)  # encoding the clips is inference
    if dist.main:
        samples = build_samples(report.clips, start.vae, encoder, cfg, cache_dir, windows, progress)
    dist.barrier()
    if not dist.main:  # the cache is complete now: read it back
        samples = build_samples(report.clips, start.vae, encoder, cfg, cache_dir, windows, None)
    fast_paths.uninstall(start.vae.model)
    defaults = VideoDefaults(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps)
    task = DiTTask(dit, start, defaults, samples, cfg.caption_dropout, objective, lora)
    if sample_prompts:
        task.sample_hook = _sample_hook(out, encoder, cfg, sample_prompts)
    return _run(task, cfg, objective, out, dist, resume_from, progress, fsdp)


def _run(task: Task, cfg: TrainConfig, objective, out: Path, dist: Dist, resume_from: Path | None,
         progress: Progress | None, fsdp: bool = False) -> dict:
    task.objective = objective
    if dist.main:
        with atomic_path(out / "train_config.json") as tmp:
            tmp.write_text(json.dumps({"config": dataclasses.asdict(cfg), "objective": dataclasses.asdict(objective)},
                                      indent=2) + "\n")
    result = train_loop(task, cfg, out, dist, resume_from, progress, fsdp)
    if dist.main:
        _finish(out, progress)
    return result


def _sample_hook(out: Path, text_encoder, cfg: TrainConfig, prompts: list[str]):
    """Videos of `prompts` from a checkpoint, made as `soragen generate --model CHECKPOINT` makes them
    (its sampling settings, the auto dtype, seeds 0, 1, ...), at the steps cfg.sample_every says."""
    def hook(checkpoint: Path, step: int) -> None:
        if step != cfg.max_steps and (not cfg.sample_every or step % cfg.sample_every):
            return
        from soragen.pipeline import Pipeline, resolve_dtype
        from soragen.io.video import write_video
        device = torch.device("cpu")
        pipe = Pipeline.from_model(load_model(checkpoint), text_encoder, device, resolve_dtype("auto", device))
        folder = out / "samples" / f"step-{step:06d}"
        for i, prompt in enumerate(prompts):
            write_video(folder / f"{i:02d}.mp4", pipe.generate(prompt, seed=i), pipe.model.video.fps)
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return hook


def _finish(out: Path, progress: Progress | None) -> None:
    from soragen.io.plots import loss_curve_png
    png = loss_curve_png(out / "metrics.jsonl", out / "loss.png")
    if progress and png:
        progress("message", f"loss curve: {png}")


def run_train_vae(cfg: TrainConfig, objective: VAEObjective, *, out: Path, preset: str = "tiny",
                  init: str | None = None, resume: bool = False, device: str = "auto",
                  progress: Progress | None = None) -> dict:
    """Train a VAE from scratch (a preset), from --init's weights, or a resumed run's."""
    if objective.decoder_only and not (init or resume):
        raise UsageError("--decoder-only fine-tunes a trained VAE: give it --init")
    dist, progress, resume_from, cfg, objective = start_run(out, resume, cfg, objective, device, progress)
    if resume_from is not None:
        vae = load_vae(resume_from / "vae")
    elif init:  # fine-tune an existing VAE (e.g. on longer clips) with a fresh optimizer
        vae = resolve_vae(init)
    else:
        torch.manual_seed(cfg.seed)
        vae = new_vae(vae_preset_config(preset))
    check_size(cfg, vae.spatial_factor)
    crop = objective.crop
    if crop and (crop % vae.spatial_factor or crop > min(cfg.height, cfg.width)):
        raise UsageError(f"--crop must be a multiple of {vae.spatial_factor} no larger than "
                         f"{min(cfg.height, cfg.width)}, not {crop}")
    report = scan(cfg, progress)
    return _run(VAETask(vae, report.clips, cfg, objective), cfg, objective, out, dist, resume_from, progress)
