"""From prompt to frames: text encoding, noise, the denoising loop, VAE decode, uint8.

The pipeline owns device and dtype. It reports progress through a callback
`progress(stage, done, total)` and never prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soragen import cpu
from soragen.dit import compile_for_sampling, pack_linears, token_grid
from soragen.errors import SoragenError, UsageError
from soragen.model_io import Model, load_model
from soragen.config import MAX_FRAMES, MAX_SIDE, MAX_STEPS, SAMPLERS
from soragen.sampling import denoise, make_scheduler
from soragen.text import TextEncoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Progress = Callable[[str, int, int], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SoragenError("--device cuda was asked for, but this machine has no CUDA device; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu.has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class StageTimes:
    """A progress callback that adds up the seconds spent in each stage (from its `done == 0` call
    to its `done == total` call) and passes every call on to `forward`."""

    def __init__(self, forward: Progress | None = None):
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self.forward = forward

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:
            self._started[stage] = now
        elif done >= total and stage in self._started:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._started.pop(stage)
        if self.forward is not None:
            self.forward(stage, done, total)


def _nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass
class Pipeline:
    model: Model
    text_encoder: TextEncoder
    device: torch.device
    dtype: torch.dtype
    compiled: bool = False

    def __post_init__(self):
        pack_linears(self.model.dit)
        self.dit_denoise = compile_for_sampling(self.model.dit) if self.compiled else self.model.dit.denoise

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", dtype: str = "auto",
             compile: bool = False) -> "Pipeline":
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model = load_model(model_dir)
        text_encoder = TextEncoder(model.text_spec, device=dev)
        if text_encoder.dim != model.dit.config.text_dim:
            raise SoragenError(f"text encoder {model.text_spec.source!r} gives {text_encoder.dim}-d embeddings, "
                               f"the DiT expects {model.dit.config.text_dim}")
        model.dit.to(dev, dt)
        # The VAE decodes in the DiT's dtype too: in bf16 on a CPU with bf16 matmuls its convolutions
        # run ~5x faster, within 2 levels of 255 of float32 (bench/run.py, tests/test_fast_paths.py).
        model.vae.to(dev, dt if dt == torch.bfloat16 else torch.float32)
        return cls(model, text_encoder, dev, dt, compile)

    # ---- what sizes work -------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of the VAE's spatial factor times the patch size."""
        return self.model.vae.spatial_factor * self.model.dit.config.patch_size[1]

    def check_request(self, frames: int, height: int, width: int, steps: int) -> None:
        if not 1 <= frames <= MAX_FRAMES:
            raise UsageError(f"--frames must be between 1 and {MAX_FRAMES}; nearest valid value: "
                             f"{min(max(frames, 1), MAX_FRAMES)}")
        if not 1 <= steps <= MAX_STEPS:
            raise UsageError(f"--steps must be between 1 and {MAX_STEPS}; nearest valid value: "
                             f"{min(max(steps, 1), MAX_STEPS)}")
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value % m or not m <= value <= MAX_SIDE:
                nearest = min(_nearest_multiple(value, m), MAX_SIDE // m * m)
                raise UsageError(f"--{name} must be a multiple of {m} between {m} and {MAX_SIDE}; "
                                 f"nearest valid value: {nearest}")

    def sampler_settings(self, sampler: str | None = None, steps: int | None = None,
                         guidance: float | None = None) -> dict:
        """The model's sampling defaults, with whatever the user set on top."""
        d = self.model.sampling
        return {"sampler": d.sampler if sampler is None else sampler, "steps": d.steps if steps is None else steps,
                "guidance": d.guidance if guidance is None else guidance}

    # ---- generation ------------------------------------------------------------------------------
    def denoiser(self, timesteps: torch.Tensor) -> "Denoiser":
        return Denoiser(self.model.dit, self.dit_denoise, timesteps, self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompt: str, frames: int | None = None, height: int | None = None,
                 width: int | None = None, steps: int = 50, guidance: float = 5.0, sampler: str = "ddim",
                 eta: float = 0.0, seed: int = 0, progress: Progress | None = None) -> np.ndarray:
        """One video for `prompt`: (frames, height, width, 3) uint8."""
        video = self.model.video
        frames = video.frames if frames is None else frames
        height = video.height if height is None else height
        width = video.width if width is None else width
        self.check_request(frames, height, width, steps)
        if sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        report = progress or (lambda stage, done, total: None)

        report("encode", 0, 1)
        cond = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
        uncond = self.text_encoder.encode([""]).to(self.device, self.dtype)
        if self.compiled:  # one text length for every prompt, so that one compile serves them all
            cond, uncond = (e.pad_to(self.text_encoder.spec.max_length) for e in (cond, uncond))
        report("encode", 1, 1)

        generator = torch.Generator("cpu").manual_seed(seed)  # the same seed gives the same noise anywhere
        shape = (1, *self.model.vae.latent_shape(frames, height, width))
        noise = torch.randn(shape, generator=generator).to(self.device)
        scheduler = make_scheduler(sampler, self.model.scheduler_config)
        scheduler.set_timesteps(steps)
        report("denoise", 0, steps)
        latent = denoise(self.denoiser(scheduler.timesteps), noise, cond, uncond, scheduler, steps, guidance,
                         eta=eta, generator=generator, progress=lambda i, n: report("denoise", i, n))
        if not torch.isfinite(latent).all():  # would decode to a black or garbage video
            raise SoragenError(f"sampling diverged: the latent holds NaN or infinite values ({sampler} "
                               f"{steps} steps, guidance {guidance:g}); a lower --guidance or another --sampler "
                               f"may help, or the model's weights are damaged")

        report("decode", 0, 1)
        out = self.model.vae.decode_uint8(latent, frames)[0]
        report("decode", 1, 1)
        return out


class Denoiser:
    """The DiT as the sampling loop calls it, `(x, t, text) -> prediction`, with the work that is
    the same at every step done once per video: the text's keys/values for every block (at its
    first call for a `text`), the adaLN modulations of the timesteps the sampler will visit (in
    batched passes of up to TABLE_STEPS steps) and the tokens' positions. Each step then runs only
    the token path, `step` (eager or compiled)."""

    TABLE_STEPS = 50

    def __init__(self, dit, step: Callable, timesteps: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.dit, self.step, self.device, self.dtype = dit, step, device, dtype
        self.timesteps = [float(t) for t in timesteps]
        self.text = None

    def prepare(self, text) -> None:
        self.text, self.table = text, {}
        self.context = self.dit.text_context(text.tokens, text.mask)

    def fill_table(self, start: int) -> None:
        """The modulations of timesteps[start : start + TABLE_STEPS], in place of the table's."""
        steps = self.timesteps[start:start + self.TABLE_STEPS]
        batch = self.text.pooled.shape[0]
        t = torch.tensor(steps, device=self.device).repeat_interleave(batch)  # step-major, as pooled below
        blocks, final = self.dit.modulation(t, self.text.pooled.repeat(len(steps), 1))
        self.table = dict(zip(steps, zip(blocks.split(batch), final.split(batch))))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        return self.step(*self.step_args(x, t, text))

    def step_args(self, x: torch.Tensor, t: torch.Tensor, text) -> tuple:
        """What `step` (the DiT's `denoise`) takes for latent x at timesteps t (B,) with `text`."""
        if text is not self.text:
            self.prepare(text)
        step = float(t[0])
        if step not in self.table and step in self.timesteps:
            self.fill_table(self.timesteps.index(step))
        modulation = self.table.get(step)
        if modulation is None or not bool((t == t[0]).all()):  # a step off the table: computed for it
            modulation = self.dit.modulation(t.to(self.device), text.pooled)
        grid = token_grid(tuple(x.shape[-3:]), self.dit.config.patch_size)
        positions = self.dit.positions(grid, self.device, self.dtype)  # cached by the DiT
        return (x.to(self.dtype), *modulation, *self.context, positions)
