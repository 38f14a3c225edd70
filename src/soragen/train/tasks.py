"""What differs between DiT and VAE training: the module trained, a micro-batch's loss, what a
checkpoint holds besides the training state."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soragen.core.config import (DiTObjective, LoRAConfig, SamplingDefaults, TextEncoderSpec, TrainConfig,
                                 VAEObjective, VideoDefaults)
from soragen.diffusion.draws import ClipDraws
from soragen.diffusion.objectives import VAEWithLoss, diffusion_loss, flow_loss
from soragen.diffusion.sampling import is_flow
from soragen.families.registry import DEFAULT
from soragen.io.model_folder import save_lora_model, save_model
from soragen.models.lora import add_lora, trainable_state
from soragen.models.vae import VideoVAE, save_vae, uint8_to_frames
from soragen.train.train_state import whole
from soragen.train.data import Clip, load_clip
from soragen.train.latent_cache import LatentSamples


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
    boundary: float | None = None  # of a two-expert model, the timestep between the experts' steps
    expert: str = ""  # the one of them trained: high (the steps at or above the boundary) or low
    image_inputs: int = 0  # images the model's videos start (and end) from: soragen.models.model.Model's
    image_encoder: object = None  # and its image encoder's spec, if any


class Task:
    """One kind of training: the trainable module, how a micro-batch's loss is computed, and
    what a checkpoint holds besides the training state."""

    kind: str
    module: torch.nn.Module
    trained = staticmethod(whole)  # the tensors training changes, which train_state/ keeps

    def loss(self, module: torch.nn.Module, items: list[int], draws: ClipDraws) -> torch.Tensor:
        """The mean of the loss of each clip of `items`, whose random draws come from `draws`."""
        raise NotImplementedError

    def num_items(self) -> int:
        raise NotImplementedError

    def write_model(self, folder: Path, ema: torch.nn.Module) -> None:
        raise NotImplementedError

    def after_save(self, folder: Path, step: int) -> None:
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
        self.lora, self.base, self.family, self.expert = lora, start.base_ref, start.family, start.expert
        self.image_inputs, self.image_encoder = start.image_inputs, start.image_encoder
        self.scheduler_config = objective.schedule(start.schedule if is_flow(start.schedule) else None)
        self.scheduler = None if objective.prediction == "flow" else training_scheduler(self.scheduler_config)
        self.levels = (0.0, 1.0)
        if start.expert:  # the noise levels of the expert's steps (a flow's level is its timestep / 1000)
            split = start.boundary / self.scheduler_config.get("num_train_timesteps", 1000)
            self.levels = (split, 1.0) if start.expert == "high" else (0.0, split)
        if lora.lora_rank:
            self.trained = trainable_state
        self.sample_hook: Callable[[Path, int], None] | None = None

    def num_items(self) -> int:
        return len(self.samples)

    def loss(self, module, items, draws):
        latents, text, condition = self.samples.batch(items, draws, self.caption_dropout)
        device = next(module.parameters()).device
        latents, text = latents.to(device), text.to(device, torch.float32)
        condition = {key: value.to(device) for key, value in condition.items()}
        first_frame = self.objective.first_frame
        if first_frame and float(torch.rand((), generator=draws.shared("first-frame"))) < first_frame:
            condition["still_frames"] = 1  # this step's clips start from their first frames (Wan 2.2 TI2V-5B)
        if self.scheduler is None:
            return flow_loss(module, self.scheduler_config, latents, text, draws, self.objective.object_weight,
                             self.levels, condition)
        return diffusion_loss(module, self.scheduler, latents, text, draws, self.objective.object_weight)

    def stored(self) -> dict:
        return {"lora": dataclasses.asdict(self.lora)}

    def build(self):
        """A new module of the trained one's structure (an FSDP run's EMA is gathered into it)."""
        from soragen.models.dit import VideoDiT
        dit = VideoDiT(self.module.config)
        return add_lora(dit, self.lora) if self.lora.lora_rank else dit

    def write_model(self, folder, ema):
        if self.lora.lora_rank:
            save_lora_model(folder, ema, self.base, self.lora, self.video, self.sampling, self.family, self.expert)
        else:
            save_model(folder, ema, self.vae, self.text_spec, self.video, self.scheduler_config, self.sampling,
                       family_name=self.family.name if self.family else DEFAULT, image_inputs=self.image_inputs,
                       image_encoder=self.image_encoder)

    def after_save(self, folder, step):
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
        """A random window of clip `index` (from `generator`); decoded clips stay in memory while they fit."""
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

    def loss(self, module, items, draws):
        video = uint8_to_frames(np.stack([self._clip(i, draws.generator(n, "window")) for n, i in enumerate(items)]))
        return module(video.to(next(module.parameters()).device), draws)

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
