"""From prompt to frames: text encoding, noise, the sampling loop, VAE decode, uint8.

The pipeline owns device and dtype, installs the CPU fast paths (`soragen.models.fast_paths`) and takes
its sampling defaults from the model. It reports progress through a callback
`progress(stage, done, total)` (soragen.core.progress) and never prints.
"""

from __future__ import annotations

import contextlib
import math
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soragen.models import fast_paths
from soragen.core.config import MAX_SIDE, ConfigError, SamplingDefaults
from soragen.layers.patches import token_grid
from soragen.models.dit import Conditioning
from soragen.core.errors import SoragenError, UsageError
from soragen.core.progress import Progress, quiet
from soragen.core.options import check_device_name, check_multiple, option_error
from soragen.models.fast_paths import has_fast_bf16
from soragen.io.model_folder import family, load_model
from soragen.models.model import Model
from soragen.diffusion.caches import make_cache, passes
from soragen.diffusion.sampling import check_timesteps, make_scheduler, sample, set_schedule
from soragen.models.text import TextEncoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def resolve_device(name: str) -> torch.device:
    """--device: auto (a GPU where there is one), cpu or cuda (refused where there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SoragenError("--device cuda was asked for, but this machine has no CUDA device; use --device cpu")
    check_device_name(name)
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def merge_lora(model: Model, file: Path, weight: float, expert: str = "both") -> None:
    """Merge the LoRA adapter `file` at `weight` into the model's DiT; of two experts into both, or
    the one `expert` ("high", "low") names."""
    from soragen.io import lora_file as lora
    if expert != "both" and model.dit_2 is None:
        raise UsageError(f"--lora {file}@{expert} names an expert; {model.path} has one")
    for i in lora.EXPERTS[expert] if model.dit_2 is not None else (0,):
        lora.apply(model.experts[i], file, family(model), weight)


class StageTimes:
    """A progress callback that adds up the seconds spent in each stage (from its `done == 0` call
    to its `done == total` call) and passes every call on to `forward`."""

    def __init__(self, forward: Progress | None = None):
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self.forward = forward

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        now = time.perf_counter()
        if done == 0:
            self._started[stage] = now
        elif done >= total and stage in self._started:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._started.pop(stage)
        if self.forward is not None:
            self.forward(stage, done, total, note)


@dataclass
class Pipeline:
    """A model ready to generate: weights on `device` in `dtype` (the VAE in float32 unless the DiT
    runs bf16), CPU fast paths installed. On a GPU the text encoder stays on the CPU (Wan's umT5 is
    four times its DiT); `offload` keeps every part on the CPU but the one running."""

    model: Model
    text_encoder: TextEncoder
    device: torch.device
    dtype: torch.dtype
    compiled: bool = False
    offload: bool = False
    image_encoder: "ImageEncoder | None" = None  # noqa: F821  (soragen.models.image_encoder; Wan 2.1 I2V's CLIP)
    split: "Split | None" = None  # noqa: F821  (soragen.models.sequence_parallel: one video over processes)

    def __post_init__(self):
        for dit in self.model.experts:
            fast_paths.install(dit)
        self.model.vae.use_fast_paths()
        self.predicts = [fast_paths.compile_for_sampling(dit) if self.compiled else dit.predict
                         for dit in self.model.experts]

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", dtype: str = "auto", compile: bool = False,
             offload: bool = False, loras: list[tuple] = ()) -> "Pipeline":
        """`loras`: (adapter file or LoRA run, weight[, expert]) merged into the DiT's weights before it
        runs; of two experts into both, or the one `expert` ("high", "low") names."""
        from soragen.io import lora_file as lora
        dev = resolve_device(device)
        files = [(lora.resolve_file(path), weight, *rest) for path, weight, *rest in loras]  # before the heavy load
        model = load_model(model_dir, resolve_dtype(dtype, dev))
        for file, weight, *rest in files:
            merge_lora(model, file, weight, *rest)
        text_device = dev if dev.type == "cpu" else torch.device("cpu")
        image_encoder = None
        if model.image_encoder is not None:
            from soragen.models.image_encoder import ImageEncoder
            image_encoder = ImageEncoder(model.image_encoder, device=text_device)
        return cls.from_model(model, TextEncoder(model.text_spec, device=text_device), dev, resolve_dtype(dtype, dev),
                              compile, offload, image_encoder)

    @classmethod
    def from_model(cls, model: Model, text_encoder: TextEncoder, device: torch.device, dtype: torch.dtype,
                   compile: bool = False, offload: bool = False, image_encoder=None) -> "Pipeline":
        if text_encoder.dim != model.dit.config.text_dim:
            raise SoragenError(f"text encoder {model.text_spec.source!r} gives {text_encoder.dim}-d embeddings, "
                               f"the DiT expects {model.dit.config.text_dim}")
        if (image_encoder is None) != (model.image_encoder is None):
            raise SoragenError(f"{model.path}: the DiT {'takes' if model.image_encoder else 'takes no'} an image "
                               f"encoder's tokens, and {'none' if image_encoder is None else 'one'} was given")
        home = torch.device("cpu") if offload else device
        for dit in model.experts:
            dit.cast(home, dtype)
        # The VAE decodes in the DiT's dtype too where that is bf16: on a CPU with bf16 matmuls its
        # convolutions run several times faster, within a few levels of 255 (tests/test_fast_paths.py).
        model.vae.to(home, dtype if dtype == torch.bfloat16 else torch.float32)
        return cls(model, text_encoder, device, dtype, compile, offload, image_encoder)

    def parallelise(self, split) -> None:
        """Share each video's steps with the other processes of the group as `split` says (rank 0
        encodes the text and decodes the video; every process gets every step's prediction)."""
        from soragen.models.sequence_parallel import parallel_predict
        self.split = split
        self.predicts = [parallel_predict(dit, split) if split.how != "none" else dit.predict
                         for dit in self.model.experts]

    @property
    def main(self) -> bool:
        """Whether this process decodes and writes (of a group sharing the steps: rank 0)."""
        return self.split is None or torch.distributed.get_rank() == 0

    @property
    def predict(self):
        """The (first) DiT's step as sampling calls it: `predict`, or its compiled graph."""
        return self.predicts[0]

    @property
    def offloading(self) -> bool:
        """Whether parts wait on the CPU and visit the device only to run (`offload` on a GPU)."""
        return self.offload and self.device.type != "cpu"

    @contextlib.contextmanager
    def running(self, part):
        """With `offload`, `part` (the DiT, the VAE's model, the text encoder) on the device while the
        block runs, back on the CPU after."""
        if self.offloading:
            part.to(self.device)
            try:
                yield
            finally:
                part.to("cpu")
        else:
            yield

    # ---- the settings of a video -----------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of the VAE's spatial factor times the patch size."""
        return self.model.vae.spatial_factor * self.model.dit.config.patch_size[1]

    def video_size(self, frames: int | None = None, height: int | None = None,
                   width: int | None = None) -> tuple[int, int, int]:
        """(frames, height, width): the model's defaults with the given values on top, checked."""
        video = self.model.video
        frames, height, width = (video.frames if frames is None else frames, video.height if height is None else height,
                                 video.width if width is None else width)
        for name, value in (("height", height), ("width", width)):
            check_multiple(name, value, self.size_multiple, MAX_SIDE)
        try:
            dataclasses.replace(video, frames=frames)
        except ConfigError as err:
            raise option_error(err) from None
        return frames, height, width

    def sampling(self, **given) -> SamplingDefaults:
        """The model's sampling settings (sampler, steps, guidance, negative_prompt, shift,
        timesteps) with the given ones (not None) on top, checked; the sampler also against the
        model's noise schedule. Given timesteps and no steps: as many steps; given steps and no
        timesteps: the model's timesteps (if any) give way."""
        given = {k: v for k, v in given.items() if v is not None}
        if given.get("timesteps") and "steps" not in given:
            given["steps"] = len(given["timesteps"])
        if "steps" in given and "timesteps" not in given:
            given["timesteps"] = ()
        try:
            settings = dataclasses.replace(self.model.sampling, **given)
        except ConfigError as err:
            raise option_error(err) from None
        make_scheduler(settings.sampler, self.model.scheduler_config)  # e.g. DDIM on a flow model: refused
        check_timesteps(settings.sampler, self.model.scheduler_config, settings.timesteps, settings.steps)
        return settings

    # ---- generation ------------------------------------------------------------------------------
    def cached_dit(self, timesteps: torch.Tensor, image_tokens: torch.Tensor | None = None):
        """The DiT as the sampling loop calls it (of two experts, the one each step's timestep picks)."""
        cached = [CachedDiT(dit, predict, timesteps, self.device, self.dtype, image_tokens)
                  for dit, predict in zip(self.model.experts, self.predicts)]
        return cached[0] if len(cached) == 1 else Experts(cached, self.model.boundary, self)

    def guidance(self, settings: SamplingDefaults, guidance_2: float | None):
        """The guidance scale: one number, or of two experts a function of the step's timestep."""
        if self.model.dit_2 is None:
            if guidance_2 is not None:
                raise UsageError(f"--guidance-2 is the second expert's guidance; {self.model.path} has one expert")
            return settings.guidance
        second = settings.guidance if guidance_2 is None else guidance_2
        return lambda t: settings.guidance if t >= self.model.boundary else second

    def encode(self, prompt: str, negative_prompt: str):
        """The prompt's and the negative prompt's TextEmbeddings, on the device in the DiT's dtype."""
        with self.running(self.text_encoder):
            cond, uncond = (self.text_encoder.encode([p]).to(self.device, self.dtype) if self.main else None
                            for p in (prompt, negative_prompt))
        if self.split is not None:  # the text encoder ran on rank 0 alone
            from soragen.models.sequence_parallel import share_text
            cond, uncond = share_text(cond, self.device, self.dtype), share_text(uncond, self.device, self.dtype)
        if self.compiled:  # one text length for every prompt, so that one compile serves them all
            cond, uncond = (e.pad_to(self.text_encoder.spec.max_length) for e in (cond, uncond))
        return cond, uncond

    @torch.no_grad()
    def sample_latent(self, prompt: str, frames: int, height: int, width: int, settings: SamplingDefaults,
                      eta: float = 0.0, seed: int = 0, progress: Progress | None = None,
                      guidance_2: float | None = None, image: np.ndarray | None = None,
                      last_image: np.ndarray | None = None, cache=None) -> torch.Tensor:
        """The sampled latent (1, C, T', H', W') of one video: what `generate` decodes. `image`
        (height, width, 3) uint8, on a model that starts from one, is its first frame; `last_image`,
        on a model that ends at one, its last. `cache`: a step cache's CacheSpec (or a function of
        the steps making one), each expert its own (soragen.diffusion.caches); the passes the DiT
        ran and skipped are left in `self.passes`."""
        guidance = self.guidance(settings, guidance_2)
        images = self.check_images(image, last_image)
        condition = None if image is None or self.model.image_channels else self.image_latent(image)
        report = progress or quiet
        report("encode", 0, 1)
        cond, uncond = self.encode(prompt, settings.negative_prompt)
        report("encode", 1, 1)
        generator = torch.Generator("cpu").manual_seed(seed)  # the same seed gives the same noise anywhere
        noise = torch.randn((1, *self.model.vae.latent_shape(frames, height, width)), generator=generator)
        scheduler = make_scheduler(settings.sampler, self.model.scheduler_config, settings.shift or None)
        set_schedule(scheduler, settings.steps, settings.timesteps)
        report("denoise", 0, settings.steps)
        # one expert is on the device while it runs; two swap there at the boundary (class Experts)
        experts = dit = self.cached_dit(scheduler.timesteps, self.image_tokens(images))
        for one in getattr(experts, "experts", [experts]):
            one.cache = make_cache(cache, settings.steps)
        if self.model.image_channels:
            dit = ImageChannels(dit, self.image_channels(images, frames))
        elif condition is not None:
            dit = FirstFrame(dit, condition)
        if self.split is not None and self.split.cfg == 2:  # guidance's halves on two groups of processes
            from soragen.models.sequence_parallel import CfgSplit
            dit = CfgSplit(dit, self.split)
        with self.running(self.model.dit) if self.model.dit_2 is None else experts.swapping():
            latent = sample(dit, noise.to(self.device), cond, uncond, scheduler, settings.steps, guidance, eta=eta,
                            generator=generator, progress=lambda i, n: report("denoise", i, n),
                            timesteps=settings.timesteps)
        self.passes = passes(getattr(experts, "experts", [experts]))
        if condition is not None:  # the image's frame as it is, not as the last step left it
            latent[:, :, :condition.shape[2]] = condition.to(latent.dtype)
        if not torch.isfinite(latent).all():  # would decode to a black or garbage video
            raise SoragenError(f"sampling diverged: the latent holds NaN or infinite values ({settings.sampler} "
                               f"{settings.steps} steps, guidance {settings.guidance:g}); a lower --guidance or "
                               f"another --sampler may help, or the model's weights are damaged")
        return latent

    def check_images(self, image: np.ndarray | None, last_image: np.ndarray | None) -> list[np.ndarray]:
        """The images a video starts (and ends) from, as many as the model takes: UsageError otherwise."""
        from soragen.io.image import check_image_count
        check_image_count(image is not None, last_image is not None, self.model.image_inputs,
                          bool(self.model.image_channels), str(self.model.path))
        return [i for i in (image, last_image) if i is not None]

    def image_latent(self, image: np.ndarray) -> torch.Tensor:
        """An image (H, W, 3) uint8 as the VAE's normalised latent of one frame (1, C, 1, H', W'), on
        the device."""
        from soragen.models.vae import uint8_to_frames
        with self.running(self.model.vae):
            return self.model.vae.encode(uint8_to_frames(np.array(image)[None, None])).to(self.device)

    def image_channels(self, images: list[np.ndarray], frames: int) -> torch.Tensor:
        """What an image-to-video DiT takes after the noisy latent (Wan's I2V): the mask of the given
        frames and the latent of the images with black between (soragen.diffusion.image_condition)."""
        from soragen.diffusion.image_condition import condition_channels
        with self.running(self.model.vae):
            return condition_channels(self.model.vae, images, frames).to(self.device)

    def image_tokens(self, images: list[np.ndarray]) -> torch.Tensor | None:
        """The image encoder's tokens of the images, where the DiT takes them (Wan 2.1 I2V, FLF2V)."""
        if self.image_encoder is None or not images:
            return None
        with self.running(self.image_encoder):
            return self.image_encoder.encode(images).to(self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompt: str, frames: int | None = None, height: int | None = None,
                 width: int | None = None, eta: float = 0.0, seed: int = 0, progress: Progress | None = None,
                 guidance_2: float | None = None, image: np.ndarray | None = None,
                 last_image: np.ndarray | None = None, cache=None, **sampling) -> np.ndarray:
        """One video for `prompt`: (frames, height, width, 3) uint8. What is not given is the model's
        (sampling: sampler, steps, guidance, negative_prompt, shift; of two experts, `guidance_2` is
        the second's, default the first's). `image` and `last_image` (any size) are fitted to the
        video's: scaled to cover it, the centre cropped (soragen.io.image). `cache`: sample_latent's."""
        frames, height, width = self.video_size(frames, height, width)
        from soragen.io.image import fit
        image, last_image = (None if i is None else fit(i, height, width) for i in (image, last_image))
        latent = self.sample_latent(prompt, frames, height, width, self.sampling(**sampling), eta, seed, progress,
                                    guidance_2, image, last_image, cache)
        if not self.main:  # of a group sharing the steps, rank 0 decodes
            return None
        report = progress or quiet
        report("decode", 0, 1)
        with self.running(self.model.vae):
            out = self.model.vae.decode_uint8(latent, frames)[0]
        report("decode", 1, 1)
        return out


class CachedDiT:
    """The DiT as the sampling loop calls it, `(x, t, text) -> prediction`, with the work that is
    the same at every step of one video done once: each block's text keys/values (at the first
    call for a `text`), the adaLN modulations of all the timesteps the sampler will visit (in
    batched passes of up to TABLE_STEPS steps) and the tokens' positions. A step then runs only
    `predict` (eager, or compiled)."""

    TABLE_STEPS = 50

    def __init__(self, dit, predict: Callable, timesteps: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 image_tokens: torch.Tensor | None = None):
        self.dit, self.predict, self.device, self.dtype = dit, predict, device, dtype
        self.image_tokens = image_tokens  # an image encoder's, for the DiT's image cross-attention
        self.timesteps = [float(t) for t in timesteps]
        self.text = None
        self.still_frames = 0  # leading latent frames that are an image's, at timestep 0 in every step
        self.cache, self.run = None, 0  # a step cache (soragen.diffusion.caches); passes run without one

    def _prepare(self, text) -> None:
        self.text, self.table, self.still = text, {}, None
        self.text_kv = self.dit.text_kv(text.tokens, text.mask, self.image_tokens)

    def _with_still(self, blocks, final, grid) -> tuple[list, torch.Tensor, list[int]]:
        """The modulations with a first row for the still frames' tokens (timestep 0, made once per
        text), and the two runs of tokens they apply to."""
        if self.still is None:
            c = self.dit.condition_vector(torch.zeros(self.text.tokens.shape[0], device=self.device), self.text.pooled)
            self.still = (self.dit.block_modulations(c), self.dit.final.modulation(c))
        still = self.still_frames * grid[1] * grid[2]
        blocks = [torch.cat([s, b], dim=1) for s, b in zip(self.still[0], blocks)]
        return blocks, torch.cat([self.still[1], final], dim=1), [still, math.prod(grid) - still]

    def _fill_table(self, start: int) -> None:
        """The modulations of timesteps[start : start + TABLE_STEPS], in place of the table's."""
        steps = self.timesteps[start:start + self.TABLE_STEPS]
        batch, pooled = self.text.tokens.shape[0], self.text.pooled
        t = torch.tensor(steps, device=self.device).repeat_interleave(batch)  # step-major, as pooled below
        c = self.dit.condition_vector(t, None if pooled is None else pooled.repeat(len(steps), 1))
        blocks = [m.split(batch) for m in self.dit.block_modulations(c)]  # [block][step]
        final = self.dit.final.modulation(c).split(batch)
        self.table = {step: ([b[i] for b in blocks], final[i]) for i, step in enumerate(steps)}

    def conditioning(self, x: torch.Tensor, t: torch.Tensor, text) -> Conditioning:
        """What `predict` takes besides x, for timesteps t (B,) and `text`."""
        if text is not self.text:
            self._prepare(text)
        step = float(t[0])
        if step not in self.table and step in self.timesteps:
            self._fill_table(self.timesteps.index(step))
        if step in self.table and bool((t == t[0]).all()):
            blocks, final = self.table[step]
        else:  # a step off the table: made for it alone
            c = self.dit.condition_vector(t.to(self.device), text.pooled)
            blocks, final = self.dit.block_modulations(c), self.dit.final.modulation(c)
        grid = token_grid(tuple(x.shape[-3:]), self.dit.config.patch_size)
        segments = None
        if self.still_frames:
            blocks, final, segments = self._with_still(blocks, final, grid)
        return Conditioning(blocks, final, self.text_kv, self.dit.positions(grid, self.device, self.dtype), segments)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        x, cond = x.to(self.dtype), self.conditioning(x, t, text)
        if self.cache is None:
            self.run += x.shape[0]
            return self.predict(x, cond)
        step = float(t[0])
        return self.cache(self.dit, x, cond, self.timesteps.index(step) if step in self.timesteps else 0)


class Experts:
    """Two experts as the sampling loop calls them (Wan 2.2 A14B): the first denoises the steps at
    or above the boundary timestep, the second the rest. With `offload` on a GPU only the running
    expert is on it: they swap there when the steps cross the boundary."""

    def __init__(self, experts: list[CachedDiT], boundary: float, pipe: Pipeline):
        self.experts, self.boundary, self.pipe = experts, boundary, pipe
        self.current: int | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        which = 0 if float(t[0]) >= self.boundary else 1
        if which != self.current and self.pipe.offloading:
            if self.current is not None:
                self.experts[self.current].dit.to("cpu")
            self.experts[which].dit.to(self.pipe.device)
        self.current = which
        return self.experts[which](x, t, text)

    @contextlib.contextmanager
    def swapping(self):
        """Around a sampling run: with `offload`, the last expert back on the CPU after it."""
        try:
            yield self
        finally:
            if self.current is not None and self.pipe.offloading:
                self.experts[self.current].dit.to("cpu")
            self.current = None


class FirstFrame:
    """A DiT (one expert or two) that starts from an image (Wan 2.2 TI2V-5B): at every step the
    image's latent stands in for the first latent frame, whose tokens are at timestep 0."""

    def __init__(self, dit, condition: torch.Tensor):
        self.dit, self.condition = dit, condition
        for cached in getattr(dit, "experts", [dit]):
            cached.still_frames = condition.shape[2]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        still = self.condition.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1)
        return self.dit(torch.cat([still, x[:, :, still.shape[2]:]], dim=2), t, text)


class ImageChannels:
    """A DiT (one expert or two) that takes its images as input channels (Wan's image-to-video):
    the mask and the images' latent after the noisy latent, the same at every step."""

    def __init__(self, dit, condition: torch.Tensor):
        self.dit, self.condition = dit, condition

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        return self.dit(torch.cat([x, self.condition.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1)], dim=1), t, text)
