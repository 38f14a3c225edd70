"""soragen generate: videos from prompts."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from soragen.cli.app import (COMPILE_HELP, STARTED, StageProgress, check_overrides, check_text, check_writable, command,
                             model_dir, note_emulated_bf16, stderr)
from soragen.cli.spread import Spread
from soragen.core.atomic import atomic_path
from soragen.core.config import MAX_SEED
from soragen.core.errors import SoragenError, UsageError
from soragen.core.options import check_device_name
from soragen.core.runtime import world_size


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, keep.split("-")))[:limit] or "video"


# ---- generate ----------------------------------------------------------------------------------

ModelOption = Annotated[Optional[Path], typer.Option(help="A soragen model folder or training run, a diffusers Wan "
                                                     "pipeline folder, or a hub id (default: the built-in model).")]
LoraOption = Annotated[Optional[list[str]], typer.Option(help="A LoRA to merge into the DiT: an adapter .safetensors "
                                                         "(diffusers' Wan layout, or the original Wan one of LightX2V, "
                                                         "Lightning and CausVid, or kohya / musubi-tuner's) or a LoRA "
                                                         "run; FILE:WEIGHT scales it; of two experts, @high or @low "
                                                         "picks one (default both). Its recommended settings, if its "
                                                         "metadata has them, are used unless given. Repeatable.",
                                                         show_default=False)]
ImageOption = Annotated[Optional[Path], typer.Option(help="An image (PNG, JPEG, WebP) to start the video from, on "
                                                     "a model that takes one (image-to-video).", show_default=False)]
LastImageOption = Annotated[Optional[Path], typer.Option(help="With --image: an image to end the video at, on a "
                                                         "model that takes one (first-last-frame).", show_default=False)]
OffloadOption = Annotated[bool, typer.Option("--offload", help="On a GPU, keep only the running part (text encoder, "
                                             "DiT, VAE) on it: for models larger than its memory.")]
GuidanceTwoOption = Annotated[Optional[float], typer.Option(help="Of a model with two experts (Wan 2.2 A14B): the "
                                                            "guidance of the second, low-noise one (default: "
                                                            "--guidance).")]
SamplerOption = Annotated[Optional[str], typer.Option(help="ddim, dpm++, unipc, euler or lcm (euler, lcm and not "
                                                     "ddim for flow models such as Wan; default: the model's).")]
TimestepsOption = Annotated[Optional[str], typer.Option(help="The timesteps to denoise at, decreasing, as a "
                                                       "step-distilled model was trained (e.g. 1000,750,500,250; "
                                                       "before --shift); flow models with euler, lcm or unipc.",
                                                       show_default=False)]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
DtypeOption = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
StepsOption = Annotated[Optional[int], typer.Option(help="Denoising steps (default: the model's).")]
HeightOption = Annotated[Optional[int], typer.Option(help="Height in pixels (default: the model's).")]
WidthOption = Annotated[Optional[int], typer.Option(help="Width in pixels (default: the model's).")]
PARALLEL = ("auto", "ulysses", "ring", "cfg")
ParallelOption = Annotated[str, typer.Option(help="Under torchrun: how the processes share each video's steps: "
                                             "cfg (guidance's two passes on two halves of them), ulysses (the "
                                             "tokens split, attention's heads exchanged), ring (the tokens split, "
                                             "keys and values passed round); auto: cfg where guidance is on and "
                                             "the count is even, then ulysses where the heads divide, else ring.")]
TimingsOption = Annotated[Optional[Path], typer.Option(help="Also write the seconds spent in each stage (imports, "
                                                       "load, encode, denoise, decode, write) and the DiT passes "
                                                       "run and skipped to this JSON file, or to stderr if it is "
                                                       "'stderr'.")]
CacheOption = Annotated[str, typer.Option(help="A step cache: none, first-block[:T], taylorseer[:K[:ORDER]] or "
                                          "magcache[:T] (after soragen calibrate-cache): skips the DiT's blocks on "
                                          "steps that barely change; T 0 (K 0) changes nothing.")]


@command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="What the video shows.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .mp4, .gif, or a folder for PNG frames. "
                                      "With --prompts, a folder.")] = Path("video.mp4"),
    prompts: Annotated[Optional[Path], typer.Option(help="A text file, one prompt per line: one video each (under "
                                                    "torchrun, each process makes its share).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames to generate (default: the model's).")] = None,
    height: HeightOption = None,
    width: WidthOption = None,
    steps: StepsOption = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale; 1 turns it off "
                                                      "(default: the model's).")] = None,
    guidance_2: GuidanceTwoOption = None,
    sampler: SamplerOption = None,
    timesteps: TimestepsOption = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="What guidance steers away from (default: the "
                                                           "model's own, empty for soragen's).")] = None,
    shift: Annotated[Optional[float], typer.Option(help="A flow model's schedule shift (default: the model's; "
                                                   "higher spends more steps at high noise).")] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like.")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Random seed: the same seed gives the same video.")] = 0,
    fps: Annotated[Optional[float], typer.Option(help="Frames per second of the file (default: the model's).")] = None,
    model: ModelOption = None,
    lora: LoraOption = None,
    image: ImageOption = None,
    last_image: LastImageOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    compile: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
    offload: OffloadOption = False,
    parallel: ParallelOption = "auto",
    cache: CacheOption = "none",
    timings: TimingsOption = None,
) -> None:
    """Generate a video from a text prompt.

    Examples:

      soragen generate "a red ball moving right in the blue sky" --out ball.mp4

      soragen generate --prompts prompts.txt --out videos/

      torchrun --nproc_per_node=2 -m soragen generate --prompts prompts.txt --out videos/

      soragen generate "a corgi on a beach" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 33 --out corgi.mp4

      soragen generate "a corgi on a beach" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --lora runs/corgi:0.8

    """
    jobs = _generate_jobs(prompt, prompts, out, seed)
    given = dict(sampler=sampler, steps=steps, guidance=guidance, shift=shift, timesteps=_parse_timesteps(timesteps))
    check_overrides(**given, frames=frames, fps=fps)
    _check_choices(device=device, dtype=dtype, eta=eta, negative_prompt=negative_prompt, guidance_2=guidance_2)
    images, step_cache = _check_images(image, last_image, model), _step_cache(cache, model)
    loras, recommended, sources = _recommended(_parse_loras(lora), given)
    spread = _spread(prompts, parallel, guidance, guidance_2)  # under torchrun with --prompts: this process's share
    index, seconds, main = _make_share(spread, jobs, (model, device, dtype, compile, offload, loras, parallel),
                                       (given, recommended, sources, negative_prompt), (frames, height, width), eta,
                                       seed, fps, guidance_2, images, step_cache)
    _finish(spread.gather(index), spread.main and main, out if prompts is not None else None, timings, seconds)


def _check_cfg_split(parallel: str, guidance: Optional[float], guidance_2: Optional[float]) -> None:
    """--parallel cfg with --guidance 1 given under torchrun: refused before a model loads for nothing
    (a model's own guidance is known once it has loaded: soragen.models.sequence_parallel.make_split)."""
    if parallel == "cfg" and guidance == 1 and guidance_2 in (None, 1) and world_size() > 1:
        from soragen.models.sequence_parallel import CFG_WITHOUT_GUIDANCE
        raise UsageError(CFG_WITHOUT_GUIDANCE)


def _spread(prompts: Optional[Path], parallel: str, guidance: Optional[float], guidance_2: Optional[float]) -> Spread:
    """With --prompts under torchrun, each process makes its share of the videos (soragen.cli.spread);
    with one PROMPT, the processes share each step of it (--parallel)."""
    if prompts is None:
        _check_cfg_split(parallel, guidance, guidance_2)
        return Spread()
    if parallel != "auto" and world_size() > 1:
        raise UsageError(f"--parallel {parallel} shares one video's steps; with --prompts under torchrun each "
                         f"process makes its own share of the videos: drop --parallel")
    return Spread.join()


def _finish(index: list[dict] | None, main: bool, folder: Path | None, timings: Path | None, seconds: dict) -> None:
    """Rank 0 (or the one process) writes the index of every video into `folder` (with --prompts);
    --timings FILE (or stderr): its seconds of each stage and the DiT passes run and skipped, as one
    JSON object."""
    if not main:
        return
    if folder is not None:
        with atomic_path(folder / "index.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in index))
        typer.echo(f"wrote {folder / 'index.jsonl'}")
    if timings is None:
        return
    line = json.dumps({**seconds, "total": time.perf_counter() - STARTED})
    if str(timings) == "stderr":
        print(line, file=sys.stderr)
    else:
        timings.write_text(line + "\n")


def _step_cache(text: str, model: Optional[Path]):
    """--cache as a CacheSpec (None for none), MagCache's with the model's calibration read:
    checked before any weight is loaded."""
    from soragen.diffusion.caches import parse_cache
    spec = parse_cache(text)
    if spec is None or spec.kind != "magcache" or spec.threshold == 0:
        return spec
    from soragen.io.cache_file import read_calibration
    from soragen.io.folders import resolve_model_dir
    return dataclasses.replace(spec, ratios=read_calibration(resolve_model_dir(model_dir(model)), model))


def _make_share(spread: Spread, jobs: list, load: tuple, sampling: tuple, size: tuple, eta, seed, fps, guidance_2,
                images, cache=None):
    """This process's share of the videos (nothing to load for none): their (i, index record), the
    seconds of each stage, and whether this process writes (of processes sharing each video's steps,
    rank 0 alone). Processes that make videos of their own (--prompts) share no steps."""
    mine, total = spread.share(jobs), len(jobs)
    if not mine:
        return [], {}, True
    load = (*load[:-1], load[-1] if spread.world == 1 else None)
    pipe, seconds = _load(*load)
    settings = _settings(pipe, *sampling, guidance_2)
    _share(pipe, load[-1], settings, guidance_2)
    size = _video_size(pipe, *size, images)
    index, main = _make_videos(pipe, mine, total, settings, size, eta, seed, fps, seconds, guidance_2, images,
                               cache), pipe.main
    if pipe.split is not None:  # every process done with the group before any leaves it
        import torch
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return index, seconds, main


def _check_images(image: Optional[Path], last_image: Optional[Path], model: Optional[Path]) -> list:
    """--image and --last-image: readable images, on a model that takes them; checked from the files
    and the model's manifest or layout, before any weight is loaded. Returns the images read."""
    from soragen.io.image import check_image_count, read_image
    from soragen.io.model_folder import family_at, image_inputs_at, model_configs
    images = [read_image(path, option) for option, path in (("--image", image), ("--last-image", last_image))
              if path is not None]
    folder = model_dir(model)
    inputs = image_inputs_at(folder)
    from_image = bool(inputs) and model_configs(folder)[0].image_channels  # an image-to-video model
    check_image_count(image is not None, last_image is not None, inputs, from_image,
                      f"{folder} ({family_at(folder).name})")
    return images


def _parse_timesteps(text: Optional[str]) -> Optional[tuple[float, ...]]:
    """--timesteps 1000,750,500,250 as numbers (their order and range are SamplingDefaults' to check)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--timesteps {text!r}: give numbers separated by commas, e.g. 1000,750,500,250") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"--timesteps {text!r}: every timestep must be a finite number")
    return values


def _parse_loras(lora: Optional[list[str]]) -> list[tuple]:
    """--lora FILE[:WEIGHT][@high|@low] as (path, weight, expert), each file found (before any weight is read)."""
    from soragen.io.lora_file import parse, parse_expert, resolve_file
    return [(resolve_file(path), weight, expert) for path, weight, expert in
            ((*parse(spec), expert) for spec, expert in map(parse_expert, lora or []))]


def _recommended(loras: list[tuple], given: dict) -> tuple[list[tuple], dict, list[str]]:
    """`loras`, the sampling settings the adapters recommend (their soragen.recipe metadata) that no
    option overrides, and the files they come from. An option given overrides its own setting; --steps
    also a recommended list of timesteps, --timesteps a recommended number of steps."""
    from soragen.io.lora_file import read_recipe
    merged = {}
    for path, *_ in loras:
        recipe = read_recipe(path)
        for key, value in recipe.items():
            if key in merged and merged[key][0] != value:
                raise SoragenError(f"--lora {merged[key][1]} and --lora {path} recommend different {key}s; give --{key}")
            merged[key] = (value, path)
    skip = {k for k, v in given.items() if v is not None}
    skip |= {"timesteps"} if given["steps"] is not None else set()
    skip |= {"steps"} if given["timesteps"] is not None else set()
    used = {k: v for k, (v, _) in merged.items() if k not in skip}
    return loras, used, sorted({str(path) for k, (_, path) in merged.items() if k in used})


def _settings(pipe, given: dict, recommended: dict, sources: list[str], negative_prompt: Optional[str],
              guidance_2: Optional[float] = None):
    """The run's sampling settings: the model's, the adapters' recommended ones on top, the options
    given on top of those; a note on stderr when recommended ones are used. A second guidance needs
    a second expert: said here, before any video."""
    pipe.guidance(pipe.model.sampling, guidance_2)
    if not recommended:
        return pipe.sampling(**given, negative_prompt=negative_prompt)
    files = f"{' and '.join(sources)} recommend{'s' if len(sources) == 1 else ''}"
    try:
        settings = pipe.sampling(**{**recommended, **{k: v for k, v in given.items() if v is not None}},
                                 negative_prompt=negative_prompt)
    except SoragenError as err:
        pipe.sampling(**given, negative_prompt=negative_prompt)  # the options' own fault: said as it is
        raise SoragenError(f"{files} settings this model cannot take: {err}") from None
    shown = ", ".join(f"{key} {_shown(value)}" for key, value in recommended.items())
    stderr().print(f"note: using the settings {files}: {shown} (an option given overrides its own)", markup=False,
                   highlight=False, soft_wrap=True)
    return settings


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _load(model, device, dtype, compile, offload, loras, parallel="auto"):
    """The pipeline, and the seconds the imports and the load took. Under torchrun with one PROMPT,
    first this process joins the group (gloo on CPUs, nccl on GPUs); `parallel` None: the processes
    make videos of their own (--prompts)."""
    from soragen.pipeline import Pipeline
    if parallel is not None and parallel not in PARALLEL:
        raise UsageError(f"--parallel {parallel!r}: choose {', '.join(PARALLEL)}")
    if world_size() == 1 and parallel != "auto":
        raise UsageError(f"--parallel {parallel} shares each video's steps between processes: start them with "
                         f"torchrun (torchrun --nproc_per_node=N -m soragen generate ... --parallel {parallel})")
    elif world_size() > 1 and parallel is not None:  # the processes share each video's steps
        if compile:
            raise UsageError("--compile under torchrun: the steps shared between processes run eagerly; drop "
                             "--compile")
        from soragen.train.parallel import init_distributed
        init_distributed(device)  # (--prompts: soragen.cli.spread has joined the group, each process its GPU)
    t0 = time.perf_counter()
    seconds = {"imports": t0 - STARTED}
    pipe = Pipeline.load(model_dir(model), device=device, dtype=dtype, compile=compile, offload=offload, loras=loras)
    seconds["load"] = time.perf_counter() - t0
    return pipe, seconds


def _share(pipe, parallel: str | None, settings, guidance_2) -> None:
    """Under torchrun with one PROMPT: split each video's steps over the processes as --parallel says."""
    if parallel is None or world_size() == 1:
        return
    from soragen.models.sequence_parallel import make_split
    guided = settings.guidance != 1 or (guidance_2 is not None and guidance_2 != 1)
    pipe.parallelise(make_split(parallel, pipe.model.dit.config.num_heads, guided))


def _video_size(pipe, frames, height, width, images) -> tuple[int, int, int]:
    """(frames, height, width): with an image and no --height/--width, the model's pixel area at the
    image's aspect ratio, rounded to the size multiple (soragen.io.image.default_size)."""
    if images and height is None and width is None:
        from soragen.io.image import default_size
        video = pipe.model.video
        height, width = default_size(images[0].shape[:2], video.height * video.width, pipe.size_multiple)
    return pipe.video_size(frames, height, width)


def _make_videos(pipe, jobs, total, settings, size, eta, seed, fps, seconds, guidance_2=None, images=(),
                 cache=None) -> list[tuple[int, dict]]:
    """Each job's video (`jobs`: (i, (prompt, path)) of `total`), written, with progress bars; the
    seconds of each stage added to `seconds`. Returns the index of what was written: (i, its
    record: prompt, file, seed)."""
    from soragen.io.video import write_video
    given = dict(eta=eta, guidance_2=guidance_2, image=images[0] if images else None,
                 last_image=images[1] if images[1:] else None, cache=cache, **dataclasses.asdict(settings))
    if not pipe.main:  # a process sharing the steps with rank 0, which writes
        for i, (text, _) in jobs:
            pipe.generate(text, *size, seed=seed + i, **given)
        return []
    console = stderr()
    console.print(f"model {pipe.model.path} on {pipe.device} in {str(pipe.dtype).replace('torch.', '')}, "
                  f"{settings.sampler} {settings.steps} steps, guidance {settings.guidance:g}"
                  f"{f', cache {cache}' if cache else ''} (loaded in {seconds['load']:.1f}s)")
    note_emulated_bf16(console, pipe.device, pipe.dtype)
    index = []
    for i, (text, path) in jobs:
        start = time.perf_counter()
        with StageProgress(f"[{i + 1}/{total}] " if total > 1 else "") as bars:
            video = pipe.generate(text, *size, seed=seed + i, progress=bars, **given)
            bars("write", 0, 1)
            result = write_video(path, video, pipe.model.video.fps if fps is None else fps)
            bars("write", 1, 1)
        for stage, spent in bars.times.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + spent
        for kind in ("run", "skipped"):
            seconds[f"dit_passes_{kind}"] = seconds.get(f"dit_passes_{kind}", 0) + pipe.passes[kind]
        if cache:
            console.print(f"{cache}: the DiT ran {pipe.passes['run']} passes and skipped {pipe.passes['skipped']}",
                          markup=False, highlight=False)
        if result.note:
            console.print(f"note: {result.note}")
        typer.echo(f"wrote {result.path} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, "
                   f"{time.perf_counter() - start:.1f}s)")
        index.append((i, {"prompt": text, "file": result.path.name, "seed": seed + i}))
    return index


def _generate_jobs(prompt: Optional[str], prompts: Optional[Path], out: Path, seed: int) -> list[tuple[str, Path]]:
    """(prompt, output path) of each video to make, checked before anything is loaded."""
    from soragen.io.video import check_output
    if (prompt is None) == (prompts is None):
        raise UsageError("give either a PROMPT or --prompts FILE (one of them, not both)")
    if prompts is not None:
        lines = _read_prompts(prompts)
        if out.suffix:
            raise UsageError(f"with --prompts, --out must be a folder, not {out}")
        jobs = [(p, out / f"{i:03d}-{_slug(p)}.mp4") for i, p in enumerate(lines)]
        check_writable(out)
    else:
        check_text(prompt, "PROMPT")
        if out.suffix.lower() not in (".mp4", ".gif", ""):
            raise UsageError(f"--out {out}: use .mp4, .gif, or a folder name for PNG frames")
        jobs = [(prompt, out)]
        check_writable(out.parent if out.suffix else out)
    for _, path in jobs:
        check_output(path)
    if seed + len(jobs) - 1 > MAX_SEED:
        raise UsageError(f"--seed {seed} + {len(jobs) - 1} (one seed per prompt) passes the largest seed, {MAX_SEED}")
    return jobs


def _read_prompts(prompts: Path) -> list[str]:
    """--prompts FILE: its lines that are not empty or # comments."""
    if not prompts.is_file():
        raise UsageError(f"--prompts {prompts}: no such file")
    try:
        lines = [line.strip() for line in prompts.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise SoragenError(f"cannot read {prompts}: {err}") from err
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise UsageError(f"--prompts {prompts} holds no prompt")
    for line in lines:
        check_text(line, f"--prompts {prompts}")
    return lines


def _check_choices(device: str = "auto", dtype: str = "auto", eta: float = 0.0, negative_prompt: str | None = None,
                   guidance_2: float | None = None) -> None:
    from soragen.pipeline import DTYPES
    if guidance_2 is not None and not 0 <= guidance_2 <= 100:
        raise UsageError(f"--guidance-2 must be between 0 and 100, got {guidance_2:g}")
    if negative_prompt is not None:
        check_text(negative_prompt, "--negative-prompt")
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    check_device_name(device)
    if not 0 <= eta <= 1:
        raise UsageError(f"--eta must be between 0 (DDIM) and 1 (DDPM-like), not {eta:g}")
