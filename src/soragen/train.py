"""Training: the DiT on cached VAE latents (`soragen train`) and the VAE itself (`soragen train-vae`).

Both share one loop: AdamW with linear warm-up, gradient accumulation and clipping, an EMA of the
weights, bf16 autocast where the hardware does bf16 fast, non-finite steps skipped, checkpoints
written under a temporary name and renamed when complete, exact resume, and DDP under torchrun.

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from soragen.config import (SamplingDefaults, TextEncoderSpec, TrainConfig, VideoDefaults, dit_preset,
                            from_dict, vae_preset_config)
from soragen.data import Clip, load_clip, require_clips, scan_clips, file_hash
from soragen.atomic import atomic_path
from soragen.errors import SoragenError, UsageError
from soragen.model_io import CHECKPOINT_RE, latest_checkpoint, save_model, load_model
from soragen.sampling import PREDICTIONS
from soragen.vae import VideoVAE, load_vae, new_vae, pad_frames, save_vae, uint8_to_frames
from soragen.weights import assert_finite, read_safetensors

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
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SoragenError("--device cuda was asked for, but this machine has no CUDA device")
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
    from soragen.cpu import has_fast_bf16
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

    def loss(self, module: torch.nn.Module, items: list[int], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def num_items(self) -> int:
        raise NotImplementedError

    def write_model(self, folder: Path, ema: torch.nn.Module) -> None:
        raise NotImplementedError

    def after_save(self, folder: Path, ema: torch.nn.Module, step: int) -> None:
        pass


class DiTTask(Task):
    kind = "dit"

    def __init__(self, dit, vae: VideoVAE, text_spec: TextEncoderSpec, video: VideoDefaults,
                 samples: "LatentSamples", caption_dropout: float, scheduler_config: dict,
                 object_weight: float = 0.0, sampling: SamplingDefaults | None = None):
        from soragen.sampling import training_scheduler
        self.module, self.vae, self.text_spec, self.video = dit, vae, text_spec, video
        self.samples, self.caption_dropout = samples, caption_dropout
        self.object_weight = object_weight
        self.sampling = sampling  # None: the generic defaults; with --init, the tuned ones of that model
        self.scheduler_config = scheduler_config
        self.scheduler = training_scheduler(scheduler_config)
        self.sample_hook: Callable[[Path, torch.nn.Module, int], None] | None = None

    def num_items(self) -> int:
        return len(self.samples)

    def loss(self, module, items, generator):
        latents, text = self.samples.batch(items, generator, self.caption_dropout)
        device = next(module.parameters()).device
        latents = latents.to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, t.to(device))
        text = text.to(device, torch.float32)
        pred = module(noisy, t.to(device), text.tokens, text.mask, text.pooled)
        # Measured in x0 terms, the epsilon loss weighs a timestep by its SNR and the velocity loss
        # by SNR + 1. At high noise (SNR < 0.1 from t = 500 on here), where a video's layout and
        # colours are decided, the epsilon loss is close to no signal at all.
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t.to(device))
        else:
            target = noise
        return object_weighted_mse(pred.float(), target, latents, self.object_weight)

    def write_model(self, folder, ema):
        save_model(folder, ema, self.vae, self.text_spec, self.video, self.scheduler_config, self.sampling)

    def after_save(self, folder, ema, step):
        if self.sample_hook:
            self.sample_hook(folder, ema, step)


# A latent cell counts as part of an object when it stands out from its row's and column's median by
# this much: with the shapes world's VAEs, that finds 83-92% of the cells under an object's pixels.
LATENT_DETAIL_THRESHOLD = 0.3


def detail_mask(video: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """(B, C, T, H, W) in [-1, 1] -> (B, 1, T, H, W), 1 where a pixel stands out from both its row's
    and its column's median colour: small objects on a plain or gradient background (a sky is
    constant along its rows). With a plain mean they are a few percent of the loss, and the VAE
    learns to drop them; a frame-wide median would also flag the ends of a gradient."""
    rows = video.median(dim=4, keepdim=True).values
    cols = video.median(dim=3, keepdim=True).values
    off = torch.minimum((video - rows).abs(), (video - cols).abs())
    return (off.amax(dim=1, keepdim=True) > threshold).float()


def object_weighted_mse(pred: torch.Tensor, target: torch.Tensor, latents: torch.Tensor,
                        object_weight: float) -> torch.Tensor:
    """MSE with the latent cells of small objects (`detail_mask` of the clean latents) weighted
    1 + object_weight. An object is a few percent of a video's cells, and what tells a square from a
    circle is a few of those: under a plain mean the DiT can ignore the shape word at almost no cost."""
    if not object_weight:
        return F.mse_loss(pred, target)
    weight = 1.0 + object_weight * detail_mask(latents, LATENT_DETAIL_THRESHOLD)
    return (weight * (pred - target) ** 2).mean() / weight.mean()


class VAEWithLoss(torch.nn.Module):
    """The VAE's training objective as one module, so DDP can wrap it: reconstruction (L1 + MSE)
    of the sampled latent, plus a KL term towards N(0, I)."""

    def __init__(self, model, kl_weight: float, sample_posterior: bool = False, detail_weight: float = 0.0,
                 decoder_only: bool = False):
        super().__init__()
        self.vae, self.kl_weight, self.sample_posterior = model, kl_weight, sample_posterior
        self.detail_weight = detail_weight
        if decoder_only:  # the latents stay exactly what a DiT was trained on; with no trainable input,
            model.encoder.requires_grad_(False)  # encoding builds no autograd graph either
            model.quant_conv.requires_grad_(False)

    def forward(self, video: torch.Tensor, noise_generator: torch.Generator) -> torch.Tensor:
        posterior = self.vae.encode(pad_frames(video)).latent_dist  # the causal VAE takes 1 + 4k frames
        z = posterior.mean
        if self.sample_posterior:  # at init the posterior std is ~1: so noisy that small objects never come back
            z = z + posterior.std * torch.randn(z.shape, generator=noise_generator).to(video.device)
        recon = self.vae.decode(z).sample.float()[:, :, : video.shape[2]]
        weight = 1.0 + self.detail_weight * detail_mask(video)
        error = (recon - video).abs() + (recon - video) ** 2
        reconstruction = (weight * error).mean() / weight.mean()
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        return reconstruction + self.kl_weight * kl


class VAETask(Task):
    kind = "vae"

    def __init__(self, vae: VideoVAE, clips: list[Clip], frames: int, fps: float, height: int, width: int,
                 kl_weight: float, sample_posterior: bool = False, detail_weight: float = 0.0,
                 decoder_only: bool = False, crop: int = 0):
        self.module = VAEWithLoss(vae.model.train().requires_grad_(True), kl_weight, sample_posterior, detail_weight,
                                  decoder_only)
        self.clips, self.frames, self.fps, self.height, self.width = clips, frames, fps, height, width
        self.crop = crop
        self._frames: dict[Path, np.ndarray] = {}
        self._bytes, self.memory_budget = 0, 4 << 30

    def num_items(self) -> int:
        return len(self.clips)

    def _clip(self, index: int, generator: torch.Generator) -> np.ndarray:
        """A random window of clip `index`; decoded clips stay in memory while they fit."""
        from soragen.data import resize_and_crop, sample_frame_indices
        from soragen.video_io import read_video
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


# ---- latent and text cache ---------------------------------------------------------------------

class LatentSamples:
    """Training examples for the DiT: per clip, one or more VAE latents of random windows plus its
    caption's text embedding, held in memory; computed once and kept in a safetensors cache."""

    def __init__(self, latents: list[torch.Tensor], tokens: list[torch.Tensor], pooled: list[torch.Tensor],
                 empty_tokens: torch.Tensor, empty_pooled: torch.Tensor):
        self.latents, self.tokens, self.pooled = latents, tokens, pooled  # latents[i]: (K, C, T, H, W)
        self.empty_tokens, self.empty_pooled = empty_tokens, empty_pooled

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, items: list[int], generator: torch.Generator, caption_dropout: float):
        from soragen.text import TextEmbedding
        latents, tokens, pooled = [], [], []
        for i in items:
            k = int(torch.randint(0, self.latents[i].shape[0], (1,), generator=generator))
            latents.append(self.latents[i][k])
            drop = float(torch.rand((), generator=generator)) < caption_dropout
            tokens.append(self.empty_tokens if drop else self.tokens[i])
            pooled.append(self.empty_pooled if drop else self.pooled[i])
        length = max(t.shape[0] for t in tokens)
        mask = torch.stack([torch.arange(length) < t.shape[0] for t in tokens])
        tokens = torch.stack([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in tokens])
        return torch.stack(latents), TextEmbedding(tokens, mask, torch.stack(pooled))


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def vae_fingerprint(vae: VideoVAE) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(vae.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(dict(vae.model.config), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def window_starts(clip: Clip, frames: int, fps: float, windows: int) -> list[int]:
    """Up to `windows` evenly spread start frames of the clip's possible crops."""
    from soragen.data import frames_needed
    last = max(0, clip.info.frames - frames_needed(frames, fps, clip.info.fps))
    count = min(windows, last + 1)
    return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})


def build_samples(clips: list[Clip], vae: VideoVAE, text_encoder, cfg: TrainConfig, cache_dir: Path | None,
                  windows: int, progress: Progress | None) -> LatentSamples:
    from safetensors.torch import save_file
    from soragen.data import resize_and_crop
    from soragen.video_io import read_video

    settings = _digest(cfg.frames, cfg.fps, cfg.height, cfg.width, windows, vae_fingerprint(vae))
    text_settings = _digest(text_encoder.spec.source, text_encoder.spec.max_length)
    if cache_dir:
        (cache_dir / "latents").mkdir(parents=True, exist_ok=True)
        (cache_dir / "text").mkdir(parents=True, exist_ok=True)
    latents: list[torch.Tensor | None] = [None] * len(clips)
    tokens, pooled = [], []
    pending: list[tuple[int, np.ndarray, Path | None]] = []  # clips whose windows still need the VAE
    hits, bad = 0, []
    # (windows, C, T, H, W) with any number of windows
    latent_shape = (None, vae.latent_channels, vae.latent_frames(cfg.frames),
                    cfg.height // vae.spatial_factor, cfg.width // vae.spatial_factor)

    def flush() -> None:  # encode pending windows in one batch: much faster than clip by clip
        if not pending:
            return
        windows_per_clip = [len(crops) for _, crops, _ in pending]
        lat = vae.encode(uint8_to_frames(np.concatenate([crops for _, crops, _ in pending]))).cpu()
        for (i, _, lat_file), part in zip(pending, lat.split(windows_per_clip)):
            latents[i] = part.contiguous()
            if lat_file:
                _atomic_save(save_file, {"latents": latents[i]}, lat_file)
        pending.clear()

    for n, clip in enumerate(clips):
        lat_file = text_file = None
        if cache_dir:
            lat_file = cache_dir / "latents" / f"{file_hash(clip.path)}-{settings}.safetensors"
            text_file = cache_dir / "text" / f"{_digest(clip.caption, text_settings)}.safetensors"
        cached = _read_cached(lat_file, {"latents": latent_shape}, bad)
        if cached is not None:
            latents[n] = cached["latents"]
            hits += 1
        else:
            frames, _ = read_video(clip.path)
            step = clip.info.fps / cfg.fps
            crops = []
            for start in window_starts(clip, cfg.frames, cfg.fps, windows):
                idx = [min(len(frames) - 1, int(math.floor(start + k * step + 0.5))) for k in range(cfg.frames)]
                crops.append(resize_and_crop(frames[idx], cfg.height, cfg.width))
            pending.append((n, np.stack(crops), lat_file))
            if sum(len(c) for _, c, _ in pending) >= 16:
                flush()
        emb = _read_cached(text_file, {"tokens": (None, text_encoder.dim), "pooled": (text_encoder.dim,)}, bad)
        if emb is None:
            e = text_encoder.encode([clip.caption])
            emb = {"tokens": e.tokens[0].cpu().contiguous(), "pooled": e.pooled[0].cpu().contiguous()}
            if text_file:
                _atomic_save(save_file, emb, text_file)
        tokens.append(emb["tokens"])
        pooled.append(emb["pooled"])
        if progress:
            progress("cache", (n + 1, len(clips)))
    flush()
    empty = text_encoder.encode([""])
    if progress:
        progress("message", f"latent cache: {hits} of {len(clips)} clips reused"
                 + ("" if cache_dir else " (cache off)"))
        if bad:
            progress("message", f"latent cache: {len(bad)} unreadable entr{'y' if len(bad) == 1 else 'ies'} "
                                f"recomputed and replaced (e.g. {bad[0]})")
    return LatentSamples(latents, tokens, pooled, empty.tokens[0].cpu(), empty.pooled[0].cpu())


def _read_cached(path: Path | None, shapes: dict[str, tuple], bad: list[Path]) -> dict | None:
    """A cache entry's tensors if the file holds them whole, with these shapes (None: any size) and
    finite; else None, and the file goes on `bad`. A cache entry cut short (a crash, a full disk)
    or damaged is a miss to recompute, never a reason to stop training."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if path is None or not path.is_file():
        return None
    try:  # copies, not maps of the file: a file cut short under a map would kill the process (SIGBUS)
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        tensors = {}
    for key, shape in shapes.items():
        t = tensors.get(key)
        if (t is None or not t.is_floating_point() or t.ndim != len(shape) or not torch.isfinite(t).all()
                or any(want is not None and got != want for got, want in zip(t.shape, shape))):
            bad.append(path)
            return None
    return tensors


def _atomic_save(save_file, tensors, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


# ---- the shared loop ---------------------------------------------------------------------------

def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = sorted(entries)
        for name, value in entries.items():
            tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) \
                else torch.tensor(value)
    return tensors, meta


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {int(pid): {name: tensors[f"{pid}.{name}"] for name in names} for pid, names in meta["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, task: Task, raw: torch.nn.Module, ema: torch.nn.Module,
                    optimizer, counters: dict, cfg: TrainConfig) -> Path:
    """checkpoint-STEP/: the model (EMA weights) + train_state/, complete before it gets its name."""
    from safetensors.torch import save_file
    assert_finite(raw, "the model")
    assert_finite(ema, "the EMA model")
    final = run_dir / f"checkpoint-{step}"
    with atomic_path(final) as staging:  # replaces a leftover of the same step from a killed run
        task.write_model(staging, ema)
        state_dir = staging / "train_state"
        state_dir.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()},
                  str(state_dir / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  str(state_dir / "ema.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(state_dir / "optimizer.safetensors"))
        (state_dir / "optimizer.json").write_text(json.dumps(meta) + "\n")
        (state_dir / "state.json").write_text(json.dumps({
            "kind": task.kind, "step": step, **counters, "config": dataclasses.asdict(cfg),
            "rng": "derived: generator of step s on rank r is seeded from (seed, r, s); epoch e's order from (seed, e)",
        }, indent=2) + "\n")
    # Only now, with the new one complete, may old checkpoints go.
    steps = sorted(int(CHECKPOINT_RE.match(p.name).group(1)) for p in run_dir.iterdir()
                   if CHECKPOINT_RE.match(p.name))
    for old in steps[:-cfg.keep_last] if cfg.keep_last > 0 else []:
        shutil.rmtree(run_dir / f"checkpoint-{old}", ignore_errors=True)
    return final


def _damaged(checkpoint: Path, what: str) -> SoragenError:
    earlier = sorted((p for p in checkpoint.parent.iterdir() if CHECKPOINT_RE.match(p.name) and p != checkpoint),
                     key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))
    hint = f"; move {checkpoint.name} aside to resume from {earlier[-1].name}" if earlier else ""
    return SoragenError(f"{what}{hint}")


def _state_json(checkpoint: Path, name: str) -> dict:
    path = checkpoint / "train_state" / name
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(checkpoint, f"cannot resume: {path} is damaged ({err})") from err


def check_resumable(checkpoint: Path) -> None:
    """The checkpoint's training state is whole, by its JSON files and its tensors' headers: checked
    when the run starts, so a damaged one is named before the clips are scanned and encoded."""
    from soragen.weights import read_header
    state_dir = checkpoint / "train_state"
    _state_json(checkpoint, "state.json")
    meta = _state_json(checkpoint, "optimizer.json")
    read_header([state_dir / "model.safetensors"])
    read_header([state_dir / "ema.safetensors"])
    stored = read_header([state_dir / "optimizer.safetensors"])
    try:
        wanted = {f"{pid}.{name}" for pid, names in meta["state"].items() for name in names}
    except (KeyError, AttributeError, TypeError) as err:
        raise _damaged(checkpoint, f"cannot resume: {state_dir / 'optimizer.json'} is damaged ({err!r})") from err
    if wanted - set(stored):
        raise _damaged(checkpoint, f"cannot resume: the optimizer state in {state_dir} does not fit this model "
                                   f"({len(wanted - set(stored))} tensors missing, e.g. {sorted(wanted - set(stored))[0]})")


def load_train_state(checkpoint: Path, raw: torch.nn.Module, ema: torch.nn.Module, optimizer) -> dict:
    from soragen.weights import load_into
    state_dir = checkpoint / "train_state"
    state = _state_json(checkpoint, "state.json")
    load_into(raw, [state_dir / "model.safetensors"], "checkpoint model")
    load_into(ema, [state_dir / "ema.safetensors"], "checkpoint EMA")
    meta = _state_json(checkpoint, "optimizer.json")
    try:
        _load_optimizer(optimizer, read_safetensors([state_dir / "optimizer.safetensors"]), meta)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _damaged(checkpoint, f"cannot resume: the optimizer state in {state_dir} does not fit this model "
                                   f"({type(err).__name__}: {err})") from err
    return state


def train_loop(task: Task, cfg: TrainConfig, run_dir: Path, dist: Dist, resume_from: Path | None,
               progress: Progress | None) -> dict:
    module = task.module.to(dist.device)
    ema = copy.deepcopy(module).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    step, counters = 0, {"skipped_nonfinite": 0}
    if resume_from is not None:
        state = load_train_state(resume_from, module, ema, optimizer)
        step, counters = state["step"], {"skipped_nonfinite": state.get("skipped_nonfinite", 0)}
    model = module
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(module)
    amp = autocast_dtype(cfg.mixed_precision, dist.device)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        finite = math.isfinite(total) and bool(torch.isfinite(grad_norm))
        if dist.world > 1:  # every rank must agree to skip, or DDP falls out of step
            flag = torch.tensor([float(finite)], device=dist.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item())
        step += 1
        if finite:
            optimizer.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), module.parameters()):
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
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            if dist.main:
                ckpt = save_checkpoint(run_dir, step, task, module, ema, optimizer, counters, cfg)
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

def prepare_run_dir(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to mix a new run into an old one."""
    out.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            raise UsageError(f"--resume: {out} has no complete checkpoint to resume from")
        return latest
    if latest is not None:
        raise UsageError(f"{out} already holds checkpoints (latest {latest.name}); pass --resume to continue "
                         f"it or choose another --out")
    return None


def stored_config(checkpoint: Path) -> TrainConfig:
    state = _state_json(checkpoint, "state.json")
    try:
        return from_dict(TrainConfig, state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise _damaged(checkpoint, f"cannot resume: {checkpoint / 'train_state' / 'state.json'}: config "
                                   f"{err}") from err


def resolve_vae(source: str) -> VideoVAE:
    """--vae: a train-vae run (its latest checkpoint), a checkpoint, a model folder, a VAE folder or a hub id."""
    path = Path(source)
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is not None:
            path = checkpoint
        return load_vae(path)
    return load_vae(source)


def start_run(out: Path, resume: bool, cfg: TrainConfig, device: str, progress: Progress | None):
    """Join the process group, pick the checkpoint to resume (rank 0 decides, the others follow),
    and on resume take the run's stored settings (only --max-steps may change)."""
    dist = init_distributed(device)
    progress = progress if dist.main else None
    resume_from = prepare_run_dir(out, resume) if dist.main else (latest_checkpoint(out) if resume else None)
    dist.barrier()
    if resume_from is not None:
        check_resumable(resume_from)
        cfg = dataclasses.replace(stored_config(resume_from), max_steps=cfg.max_steps)
    return dist, progress, resume_from, cfg


def check_size(cfg: TrainConfig, multiple: int) -> None:
    for name, value in (("height", cfg.height), ("width", cfg.width)):
        if value % multiple:
            raise UsageError(f"--{name} must be a multiple of {multiple}; nearest valid value: "
                             f"{max(multiple, round(value / multiple) * multiple)}")


def scan(cfg: TrainConfig, progress: Progress | None):
    report = scan_clips(Path(cfg.data), cfg.frames, cfg.fps,
                        progress=(lambda d, n: progress("scan", (d, n))) if progress else None)
    require_clips(report, cfg.data)
    if progress:
        progress("message", report.summary())
        for line in report.skipped_details():
            progress("message", "  skipped " + line)
    return report


def run_train(cfg: TrainConfig, out: Path, preset: str, text_source: str, vae_source: str | None,
              init: str | None, resume: bool, cache_dir: Path | None, windows: int, device: str,
              sample_prompts: list[str], progress: Progress | None, prediction: str = "v_prediction",
              object_weight: float = 0.0, zero_terminal_snr: bool = False) -> dict:
    from soragen.dit import VideoDiT
    from soragen.text import TextEncoder

    if prediction not in PREDICTIONS:
        raise UsageError(f"--prediction must be one of {', '.join(PREDICTIONS)}")
    if object_weight < 0:
        raise UsageError("--object-weight must be 0 or more")
    if zero_terminal_snr and prediction != "v_prediction":
        raise UsageError("--zero-terminal-snr needs --prediction v_prediction: at its last step the input is "
                         "all noise, so predicting the noise says nothing about the clip")
    cfg = dataclasses.replace(cfg, extra={"prediction": prediction, "object_weight": object_weight,
                                          "zero_terminal_snr": zero_terminal_snr})
    dist, progress, resume_from, cfg = start_run(out, resume, cfg, device, progress)
    prediction = cfg.extra.get("prediction", "epsilon")  # a resumed run keeps its own (older runs: epsilon)
    object_weight = cfg.extra.get("object_weight", 0.0)
    schedule = {"prediction_type": prediction}
    if cfg.extra.get("zero_terminal_snr", False):
        schedule["rescale_betas_zero_snr"] = True
    sampling = None
    if resume_from is not None:
        model = load_model(resume_from)
        vae, text_spec, dit_config, sampling = model.vae, model.text_spec, model.dit.config, model.sampling
    else:
        text_spec = TextEncoderSpec(source=text_source)
        if init:
            base = load_model(init)
            vae, text_spec, dit_config, sampling = base.vae, base.text_spec, base.dit.config, base.sampling
            if vae_source:  # move the DiT onto another VAE's latents, e.g. a fine-tuned one
                vae = resolve_vae(vae_source)
                if vae.latent_channels != dit_config.in_channels:
                    raise UsageError(f"--vae {vae_source} makes {vae.latent_channels}-channel latents; the --init "
                                     f"DiT takes {dit_config.in_channels}")
        else:
            vae = resolve_vae(vae_source) if vae_source else None
            if vae is None:
                raise UsageError("soragen train needs a VAE: --vae RUN_DIR_OR_MODEL (train one with soragen "
                                 "train-vae) or a pretrained Wan 2.1 VAE folder or hub id")
    text_encoder = TextEncoder(text_spec)
    if resume_from is None and not init:
        dit_config = dit_preset(preset, in_channels=vae.latent_channels, text_dim=text_encoder.dim)
    check_size(cfg, vae.spatial_factor * dit_config.patch_size[1])
    torch.manual_seed(cfg.seed)  # the initial weights
    dit = VideoDiT(dit_config)
    if init and resume_from is None:
        dit.load_state_dict(base.dit.state_dict())
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.train().requires_grad_(True)

    report = scan(cfg, progress)
    if dist.main:
        samples = build_samples(report.clips, vae, text_encoder, cfg, cache_dir, windows, progress)
    dist.barrier()
    if not dist.main:  # the cache is complete now: read it back
        samples = build_samples(report.clips, vae, text_encoder, cfg, cache_dir, windows, None)
    video = VideoDefaults(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps)
    task = DiTTask(dit, vae, text_spec, video, samples, cfg.caption_dropout, schedule, object_weight, sampling)
    if sample_prompts:
        task.sample_hook = _sample_hook(out, text_encoder, cfg, sample_prompts)
    if dist.main:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    result = train_loop(task, cfg, out, dist, resume_from, progress)
    if dist.main:
        _finish(out, progress)
    return result


def _sample_hook(out: Path, text_encoder, cfg: TrainConfig, prompts: list[str]):
    def hook(checkpoint: Path, ema, step: int) -> None:
        if step != cfg.max_steps and (not cfg.sample_every or step % cfg.sample_every):
            return
        from soragen.pipeline import Pipeline
        from soragen.video_io import write_video
        model = load_model(checkpoint)
        pipe = Pipeline(model, text_encoder, torch.device("cpu"), torch.float32)
        folder = out / "samples" / f"step-{step:06d}"
        for i, prompt in enumerate(prompts):
            frames = pipe.generate(prompt, steps=25, seed=i)
            write_video(folder / f"{i:02d}.mp4", frames, cfg.fps)
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return hook


def _finish(out: Path, progress: Progress | None) -> None:
    from soragen.plots import loss_curve_png
    png = loss_curve_png(out / "metrics.jsonl", out / "loss.png")
    if progress and png:
        progress("message", f"loss curve: {png}")


def run_train_vae(cfg: TrainConfig, out: Path, preset: str, resume: bool, device: str, kl_weight: float,
                  progress: Progress | None, init: str | None = None, sample_posterior: bool = False,
                  detail_weight: float = 0.0, decoder_only: bool = False, crop: int = 0) -> dict:
    if decoder_only and not (init or resume):
        raise UsageError("--decoder-only fine-tunes a trained VAE: give it --init")
    cfg = dataclasses.replace(cfg, extra={"kl_weight": kl_weight, "sample_posterior": sample_posterior,
                                          "detail_weight": detail_weight, "decoder_only": decoder_only,
                                          "crop": crop})
    dist, progress, resume_from, cfg = start_run(out, resume, cfg, device, progress)
    kl_weight, sample_posterior = cfg.extra["kl_weight"], cfg.extra["sample_posterior"]  # a resumed run's own
    detail_weight = cfg.extra.get("detail_weight", 0.0)
    decoder_only = cfg.extra.get("decoder_only", False)
    crop = cfg.extra.get("crop", 0)
    if resume_from is not None:
        vae = load_vae(resume_from / "vae")
    elif init:  # fine-tune an existing VAE (e.g. on longer clips) with a fresh optimizer
        vae = resolve_vae(init)
    else:
        torch.manual_seed(cfg.seed)
        vae = new_vae(vae_preset_config(preset))
    check_size(cfg, vae.spatial_factor)
    if crop < 0 or (crop and (crop % vae.spatial_factor or crop > min(cfg.height, cfg.width))):
        raise UsageError(f"--crop must be a multiple of {vae.spatial_factor} no larger than "
                         f"{min(cfg.height, cfg.width)}, not {crop}")
    report = scan(cfg, progress)
    task = VAETask(vae, report.clips, cfg.frames, cfg.fps, cfg.height, cfg.width, kl_weight, sample_posterior,
                   detail_weight, decoder_only, crop)
    if dist.main:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    result = train_loop(task, cfg, out, dist, resume_from, progress)
    if dist.main:
        _finish(out, progress)
    return result
