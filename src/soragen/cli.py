"""The `soragen` command line. The only module that prints or knows about exit codes.

Heavy imports (torch, transformers, diffusers) happen inside the commands, so `soragen --help`
answers at once.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # for the import time that generate --timings reports

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from soragen import __version__
from soragen.core.config import (MAX_SEED, ConfigError, DiTObjective, LoRAConfig, TrainConfig,  # stdlib only: cheap
                            VAEObjective)
from soragen.core.errors import SoragenError, UsageError
from soragen.core.options import check_device_name, option_error

app = typer.Typer(
    name="soragen",
    help="Text to video with a Sora-style diffusion transformer (DiT), hackable and fast on a CPU.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_debug = False
COMPILE_HELP = ("torch.compile the DiT: tens of seconds of compiling per video size the first time, a few once torch "
                "has cached it, then faster steps; pays off over many videos.")
MISTAKE_ROWS = 8  # soragen eval lists this many of its most frequent mistakes


def _stderr():
    from rich.console import Console
    return Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"soragen {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
) -> None:
    global _debug
    _debug = debug


# ---- shared bits -------------------------------------------------------------------------------

def command(*args, **kwargs):
    """app.command(), with every number option checked finite before the command runs: click takes
    "nan" and "inf" for a float, and a NaN guidance scale would make an all-black video."""
    def register(func):
        @functools.wraps(func)
        def checked(**params):
            for name, value in params.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise UsageError(f"--{name.replace('_', '-')} must be a finite number, not {value}")
            return func(**params)
        return app.command(*args, **kwargs)(checked)
    return register


def _check_overrides(**options) -> None:
    """Options that override a model's defaults pass the checks the model's own values pass
    (soragen.core.config's SamplingDefaults and VideoDefaults), before anything is loaded."""
    from soragen.core.config import ConfigError, SamplingDefaults, VideoDefaults
    for cls in (SamplingDefaults, VideoDefaults):
        names = {f for f in cls.__dataclass_fields__}
        try:
            cls(**{k: v for k, v in options.items() if k in names and v is not None})
        except ConfigError as err:
            raise option_error(err) from None


def _check_text(text: str, what: str) -> None:
    """Text from argv that was not valid UTF-8 arrives with surrogate escapes; no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(text[err.start])
        raise UsageError(f"{what} is not valid UTF-8 text (byte 0x{byte - 0xDC00 if byte >= 0xDC00 else byte:02x} "
                         f"at character {err.start})") from None


def _model_dir(model: Optional[Path]) -> Path:
    from soragen.io.folders import default_model_dir
    if model is not None:
        return model
    default = default_model_dir()
    if default is None:
        raise UsageError("no --model given and this install has no default model; pass --model DIR")
    return default


def _check_writable(path: Path) -> None:
    """Fail before the long work if the output cannot be written."""
    parent = path if path.is_dir() else path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoragenError(f"cannot write to {path}: {err.strerror or err}") from err
    if not os.access(parent, os.W_OK):
        raise SoragenError(f"cannot write to {path}: {parent} is not writable")


class StageProgress:
    """Rich progress bars for the pipeline's (stage, done, total) callbacks."""

    def __init__(self, label: str = ""):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from soragen.pipeline import StageTimes
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=_stderr(), transient=True)
        self.label, self.tasks = label, {}
        self.times = StageTimes(self._show)

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.times(stage, done, total)

    def _show(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(f"{self.label}{stage}", total=total)
        self.bars.update(self.tasks[stage], completed=done, total=total)


def _note_emulated_bf16(console, device, dtype) -> None:
    """bf16 asked for on a CPU that only emulates it: it runs (torch's own kernels), but slowly."""
    import torch
    from soragen.models.fast_paths import has_fast_bf16
    if device.type == "cpu" and dtype == torch.bfloat16 and not has_fast_bf16():
        console.print("note: this CPU has no bf16 matmul units (AVX512-BF16 or AMX): bfloat16 runs through "
                      "torch's emulated kernels, slower than float32 (--dtype auto picks float32 here)")


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, keep.split("-")))[:limit] or "video"


# ---- generate ----------------------------------------------------------------------------------

@command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="What the video shows.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .mp4, .gif, or a folder for PNG frames. "
                                      "With --prompts, a folder.")] = Path("video.mp4"),
    prompts: Annotated[Optional[Path], typer.Option(help="A text file, one prompt per line: one video each.")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames to generate (default: the model's).")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels (default: the model's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels (default: the model's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale; 1 turns it off "
                                                      "(default: the model's).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim, dpm++, unipc or euler (euler and not ddim for flow "
                                                   "models such as Wan; default: the model's).")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="What guidance steers away from (default: the "
                                                           "model's own, empty for soragen's).")] = None,
    shift: Annotated[Optional[float], typer.Option(help="A flow model's schedule shift (default: the model's; "
                                                   "higher spends more steps at high noise).")] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like.")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Random seed: the same seed gives the same video.")] = 0,
    fps: Annotated[Optional[float], typer.Option(help="Frames per second of the file (default: the model's).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="A soragen model folder or training run, a diffusers Wan "
                                                  "pipeline folder, or a hub id (default: the built-in model).")] = None,
    lora: Annotated[Optional[list[str]], typer.Option(help="A LoRA to merge into the DiT: an adapter .safetensors "
                                                      "(diffusers' Wan layout, or the original Wan or musubi-tuner "
                                                      "ones) or a LoRA run; FILE:WEIGHT scales it. Repeatable.",
                                                      show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
    offload: Annotated[bool, typer.Option("--offload", help="On a GPU, keep only the running part (text encoder, "
                                          "DiT, VAE) on it: for models larger than its memory.")] = False,
    timings: Annotated[Optional[Path], typer.Option(help="Also write the seconds spent in each stage (imports, "
                                                    "load, encode, denoise, decode, write) to this JSON file.")] = None,
) -> None:
    """Generate a video from a text prompt.

    Examples:

      soragen generate "a red ball moving right in the blue sky" --out ball.mp4

      soragen generate "sora is sky" --frames 16 --steps 20 --seed 3 --out sky.gif

      soragen generate --prompts prompts.txt --out videos/

      soragen generate "a corgi on a beach" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 33 --out corgi.mp4

      soragen generate "a corgi on a beach" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --lora runs/corgi:0.8
    """
    from soragen.pipeline import Pipeline
    from soragen.io.video import write_video
    jobs = _generate_jobs(prompt, prompts, out, seed)
    _check_overrides(sampler=sampler, steps=steps, guidance=guidance, shift=shift, frames=frames, fps=fps)
    if negative_prompt is not None:
        _check_text(negative_prompt, "--negative-prompt")
    _check_choices(device=device, dtype=dtype, eta=eta)
    t0 = time.perf_counter()
    seconds = {"imports": t0 - _STARTED}
    from soragen.io.lora_file import parse
    loras = [parse(spec) for spec in lora or []]
    pipe = Pipeline.load(_model_dir(model), device=device, dtype=dtype, compile=compile, offload=offload, loras=loras)
    seconds["load"] = time.perf_counter() - t0
    settings = pipe.sampling(sampler=sampler, steps=steps, guidance=guidance, negative_prompt=negative_prompt, shift=shift)
    frames, height, width = pipe.video_size(frames, height, width)
    console = _stderr()
    console.print(f"model {pipe.model.path} on {pipe.device} in {str(pipe.dtype).replace('torch.', '')}, "
                  f"{settings.sampler} {settings.steps} steps, guidance {settings.guidance:g} "
                  f"(loaded in {seconds['load']:.1f}s)")
    _note_emulated_bf16(console, pipe.device, pipe.dtype)
    index = []
    for i, (text, path) in enumerate(jobs):
        start = time.perf_counter()
        with StageProgress(f"[{i + 1}/{len(jobs)}] " if len(jobs) > 1 else "") as bars:
            video = pipe.generate(text, frames, height, width, eta=eta, seed=seed + i, progress=bars,
                                  **dataclasses.asdict(settings))
            bars("write", 0, 1)
            result = write_video(path, video, pipe.model.video.fps if fps is None else fps)
            bars("write", 1, 1)
        for stage, spent in bars.times.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + spent
        if result.note:
            console.print(f"note: {result.note}")
        typer.echo(f"wrote {result.path} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, "
                   f"{time.perf_counter() - start:.1f}s)")
        index.append({"prompt": text, "file": result.path.name, "seed": seed + i})
    if prompts is not None:
        (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
        typer.echo(f"wrote {out / 'index.jsonl'}")
    if timings is not None:
        timings.write_text(json.dumps({**seconds, "total": time.perf_counter() - _STARTED}) + "\n")


def _generate_jobs(prompt: Optional[str], prompts: Optional[Path], out: Path, seed: int) -> list[tuple[str, Path]]:
    """(prompt, output path) of each video to make, checked before anything is loaded."""
    from soragen.io.video import check_output
    if (prompt is None) == (prompts is None):
        raise UsageError("give either a PROMPT or --prompts FILE (one of them, not both)")
    if prompts is not None:
        if not prompts.is_file():
            raise UsageError(f"--prompts {prompts}: no such file")
        try:
            lines = [line.strip() for line in prompts.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise SoragenError(f"cannot read {prompts}: {err}") from err
        lines = [line for line in lines if line and not line.startswith("#")]
        if not lines:
            raise UsageError(f"--prompts {prompts} holds no prompt")
        if out.suffix:
            raise UsageError(f"with --prompts, --out must be a folder, not {out}")
        jobs = [(p, out / f"{i:03d}-{_slug(p)}.mp4") for i, p in enumerate(lines)]
        _check_writable(out)
    else:
        _check_text(prompt, "PROMPT")
        if out.suffix.lower() not in (".mp4", ".gif", ""):
            raise UsageError(f"--out {out}: use .mp4, .gif, or a folder name for PNG frames")
        jobs = [(prompt, out)]
        _check_writable(out.parent if out.suffix else out)
    for _, path in jobs:
        check_output(path)
    if seed + len(jobs) - 1 > MAX_SEED:
        raise UsageError(f"--seed {seed} + {len(jobs) - 1} (one seed per prompt) passes the largest seed, {MAX_SEED}")
    return jobs


def _check_choices(device: str = "auto", dtype: str = "auto", eta: float = 0.0) -> None:
    from soragen.pipeline import DTYPES
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    check_device_name(device)
    if not 0 <= eta <= 1:
        raise UsageError(f"--eta must be between 0 (DDIM) and 1 (DDPM-like), not {eta:g}")


# ---- inspect-patches ---------------------------------------------------------------------------

@command("inspect-patches")
def inspect_patches(
    video: Annotated[Path, typer.Argument(help="A video file (mp4, mov, mkv, avi, webm, gif).", show_default=False)],
    model: Annotated[Optional[Path], typer.Option(help="Model folder (default: the built-in model).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames to take from the start (default: the model's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to save the picture (default: VIDEO.patches.png "
                                                "in the current folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show how the model sees a video: latent grid, spacetime patches, tokens, attention cost.

    Examples:

      soragen inspect-patches clip.mp4

      soragen inspect-patches clip.mp4 --frames 9 --out patches.png --json
    """
    from soragen.tools.patches import analyse, draw_patches
    from soragen.io.model_folder import load_model
    _check_overrides(frames=frames)
    out = out or Path(f"{video.stem}.patches.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the picture is a .png")
    _check_writable(out.parent)
    loaded = load_model(_model_dir(model))
    report, picture = analyse(video, loaded, frames)
    draw_patches(picture, report, out)
    report["picture"] = str(out)
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"how the model sees {video.name}", show_header=False)
    for key, label in [("input", "input video"), ("used", "taken"), ("resize", "resize"),
                       ("latent_shape", "VAE latent [C, T, H, W]"), ("compression", "VAE compression"),
                       ("patch_size", "patch [t, h, w]"), ("token_grid", "token grid [t, h, w]"),
                       ("tokens_per_latent_frame", "tokens per latent frame"), ("num_tokens", "tokens in all"),
                       ("attention", "attention cost"), ("picture", "picture")]:
        table.add_row(label, str(report[key]))
    Console().print(table)


# ---- training ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _train_progress(total_steps: int):
    """A callback for train events: a scan/cache bar, then a step bar with loss, steps/s, ETA."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    console = _stderr()
    bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    tasks: dict[str, int] = {}

    def progress(event: str, info) -> None:
        if not bars.live.is_started:
            bars.start()
        if event in ("scan", "cache"):
            done, total = info
            label = "scanning clips" if event == "scan" else "encoding latents"
            if event not in tasks:
                tasks[event] = bars.add_task(label, total=total, info="")
            bars.update(tasks[event], completed=done, total=total)
        elif event == "step":
            if "step" not in tasks:
                tasks["step"] = bars.add_task("training", total=total_steps, completed=info["step"] - 1, info="")
            loss = "skipped" if info["loss"] is None else f"{info['loss']:.4f}"
            bars.update(tasks["step"], completed=info["step"],
                        info=f"loss {loss}  {info['steps_per_s']:.2f} steps/s")
        else:
            console.print(info, soft_wrap=True, highlight=False)  # a path must stay copyable

    try:
        yield progress
    finally:
        bars.stop()


OPTION_NAMES = {"warmup_steps": "warmup"}  # config fields whose option is named otherwise
OPTION_ALIASES = {"prediction": ("--objective",)}  # further names of a field's option


def config_options(**configs: tuple[type, dict]):
    """Give a command one option per field of config dataclasses, with the name, type, range and help
    the dataclass declares (soragen.core.config), and hand it one instance of each: `cfg=(TrainConfig,
    {"batch_size": 4})` adds --data, --frames, ... (defaults overridden as given) and calls the
    command with cfg=TrainConfig(...). Values out of range are usage errors naming the option."""
    import inspect
    import typing

    def wrap(func):
        fields = {name: [f for f in dataclasses.fields(cls) if "help" in f.metadata] for name, (cls, _) in configs.items()}
        added = []
        for name, (cls, defaults) in configs.items():
            hints = typing.get_type_hints(cls)
            for f in fields[name]:
                option = "--" + OPTION_NAMES.get(f.name, f.name).replace("_", "-")
                limits = {"min": 0, "max": MAX_SEED} if f.name == "seed" else {}
                option = f"{option}/--no-{option[2:]}" if hints[f.name] is bool else option
                added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                               default=defaults.get(f.name, f.default),
                                               annotation=Annotated[hints[f.name], typer.Option(
                                                   option, *OPTION_ALIASES.get(f.name, ()), help=f.metadata["help"],
                                                   **limits)]))

        @functools.wraps(func)
        def run(**params):
            for name, (cls, _) in configs.items():
                try:
                    params[name] = cls(**{f.name: params.pop(f.name) for f in fields[name]})
                except ConfigError as err:
                    raise option_error(err, OPTION_NAMES) from None
            return func(**params)

        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(func).parameters.values()
               if p.name not in configs]
        run.__signature__ = inspect.Signature(added + own)  # --data first, as a user reads them
        return run
    return wrap


Out = Annotated[Path, typer.Option(help="Run folder: checkpoint-STEP/ folders, metrics.jsonl, loss.png.")]
Resume = Annotated[bool, typer.Option(help="Continue from the latest complete checkpoint in --out.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


@command()
@config_options(cfg=(TrainConfig, {}), objective=(DiTObjective, {}), lora=(LoRAConfig, {}))
def train(
    cfg: TrainConfig,
    objective: DiTObjective,
    lora: LoRAConfig,
    out: Out = Path("runs/dit"),
    vae: Annotated[Optional[str], typer.Option(help="The frozen VAE: a train-vae run, a model folder, a VAE "
                                               "folder or hub id (default: the built-in model's, or with --init "
                                               "that model's).")] = None,
    text_encoder: Annotated[str, typer.Option(help="The frozen text encoder: 'default' (all-MiniLM-L6-v2), "
                                              "a hub id or a folder.")] = "default",
    preset: Annotated[str, typer.Option(help="DiT size: test, tiny, small, base, large.")] = "tiny",
    init: Annotated[Optional[str], typer.Option(help="Start from this model's weights: what generate --model takes "
                                               "(a soragen folder or run, a diffusers Wan folder, a hub id); its "
                                               "checkpoints keep its sampling settings.")] = None,
    resume: Resume = False,
    cache: Annotated[bool, typer.Option(help="Cache VAE latents and text embeddings.")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache folder (default ~/.cache/soragen).")] = None,
    windows: Annotated[int, typer.Option(min=1, max=64, help="Temporal crops cached per clip.")] = 4,
    samples: Annotated[Optional[Path], typer.Option(help="Prompts for sample videos, one per line.")] = None,
    device: Device = "auto",
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun, shard weights, gradients and optimizer "
                                       "state across the processes (FSDP2), for models one device cannot hold; "
                                       "checkpoints are sharded too.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (parameters, trained parameters, "
                                          "tokens per clip, memory per device) and stop.")] = False,
) -> None:
    """Train the DiT on a folder of captioned clips (VAE and text encoder frozen).

    Examples:

      soragen train --data clips/ --vae runs/vae --out runs/dit --max-steps 2000

      torchrun --nproc_per_node=2 -m soragen train --data clips/ --out runs/dit

      torchrun --nnodes=2 --nproc_per_node=8 ... -m soragen train --init ... --data clips/ --fsdp

      soragen train --data clips/ --out runs/dit --resume --max-steps 4000

      soragen train --data clips/ --init runs/dit --vae runs/vae2 --out runs/dit2

      soragen train --init Wan-AI/Wan2.1-T2V-1.3B-Diffusers --data clips/ --out runs/corgi --lora-rank 32
    """
    from soragen.train.run import run_train
    if vae is None and init is None and not resume:
        from soragen.io.folders import default_model_dir
        default = default_model_dir()
        if default is None:
            raise UsageError("no --vae given and this install has no default model; train one with soragen train-vae")
        vae = str(default / "vae")
    if dry_run:
        from soragen.train.plan import plan_run
        if resume:
            from soragen.io.folders import latest_checkpoint
            init = str(latest_checkpoint(out) or out)
        for line in plan_run(cfg, lora, init, vae, preset, text_encoder).lines():
            typer.echo(line)
        return
    from soragen.core.atomic import undo_new_folders
    with _train_progress(cfg.max_steps) as progress, undo_new_folders(out):  # a failed start leaves no folder
        result = run_train(cfg, objective, out=out, preset=preset, text_encoder=text_encoder, vae=vae,
                           init=init, resume=resume, cache_dir=(cache_dir or _default_cache()) if cache else None,
                           windows=windows, device=device, sample_prompts=_sample_prompts(samples), progress=progress,
                           lora=lora, fsdp=fsdp)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"trained to step {result['step']} (last loss {result['loss']:.4f}, "
                   f"{result['skipped_nonfinite']} non-finite steps skipped); model: {out}")


def _sample_prompts(path: Optional[Path]) -> list[str]:
    if path is None:
        from soragen.tools.shapes import load_sample_prompts
        return load_sample_prompts()
    if not path.is_file():
        raise UsageError(f"--samples {path}: no such file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "soragen"


# train-vae's own defaults: smaller batches, a higher rate, and no bf16 (its gradients overflow in the
# Wan VAE's norms: NaN steps would be skipped)
VAE_TRAINING = {"batch_size": 4, "lr": 5e-4, "warmup_steps": 50, "max_steps": 1000, "ema_decay": 0.99,
                "mixed_precision": "no"}


@command("train-vae")
@config_options(cfg=(TrainConfig, VAE_TRAINING), objective=(VAEObjective, {}))
def train_vae(
    cfg: TrainConfig,
    objective: VAEObjective,
    out: Out = Path("runs/vae"),
    preset: Annotated[str, typer.Option(help="VAE size: test, tiny, small.")] = "tiny",
    init: Annotated[Optional[str], typer.Option(help="Start from this VAE's weights (a train-vae run, model or "
                                                "VAE folder) instead of random ones.")] = None,
    resume: Resume = False,
    device: Device = "auto",
) -> None:
    """Train the 3D causal VAE from scratch (reconstruction + KL) on a folder of clips. Train on as
    many --frames as you will generate: the causal cache only learns the chunks it sees.

    Examples:

      soragen train-vae --data clips/ --out runs/vae --max-steps 1000

      soragen train --data clips/ --vae runs/vae --out runs/dit

      soragen train-vae --data clips/ --init runs/vae --decoder-only --out runs/vae-dec
    """
    from soragen.train.run import run_train_vae
    from soragen.core.atomic import undo_new_folders
    with _train_progress(cfg.max_steps) as progress, undo_new_folders(out):  # a failed start leaves no folder
        result = run_train_vae(cfg, objective, out=out, preset=preset, init=init, resume=resume, device=device,
                               progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"trained the VAE to step {result['step']} (last loss {result['loss']:.4f}); use it with "
                   f"soragen train --vae {out}")


# ---- shapes world ------------------------------------------------------------------------------

@command("make-dataset")
def make_dataset(
    world: Annotated[str, typer.Argument(help="Which synthetic world: shapes.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Folder to write the clips and captions into.", show_default=False)],
    n: Annotated[int, typer.Option(help="Number of clips.")] = 720,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed: the same seed writes the same clips.")] = 0,
    frames: Annotated[int, typer.Option(help="Frames per clip.")] = 16,
    size: Annotated[int, typer.Option(help="Width and height in pixels.")] = 64,
) -> None:
    """Write a synthetic data set of captioned clips (MP4 + .txt + metadata.jsonl).

    Example:

      soragen make-dataset shapes data/shapes --n 720 --seed 0
    """
    from soragen.tools.shapes import make_dataset as make
    if world != "shapes":
        raise UsageError(f"unknown world {world!r}; available: shapes")
    if n < 1 or frames < 2 or size < 16:
        raise UsageError("--n must be >= 1, --frames >= 2 and --size >= 16")
    from rich.progress import Progress
    with Progress(console=_stderr(), transient=True) as bars:
        task = bars.add_task("writing clips", total=n)
        paths = make(out, n=n, seed=seed, frames=frames, size=size,
                     progress=lambda done, total: bars.update(task, completed=done))
    typer.echo(f"wrote {len(paths)} clips to {out}")


@command()
def export(
    model: Annotated[Path, typer.Argument(help="A model folder, checkpoint or training run, a diffusers Wan pipeline "
                                          "folder or a hub id.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Where to write the model folder.", show_default=False)],
    weights_dtype: Annotated[str, typer.Option(help="Store DiT weights as float32, bfloat16 or float16.")] = "float32",
    sampler: Annotated[Optional[str], typer.Option(help="Default sampler of the exported model.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Default denoising steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Default guidance scale.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds an earlier export (as a whole; "
                                        "a folder holding anything else is never replaced).")] = False,
) -> None:
    """Copy a model (e.g. a run's latest checkpoint) into a clean model folder, without training
    state, optionally with smaller weights and new sampling defaults. OUT must be new, empty, or
    (with --force) an earlier export, and outside the model it exports.

    Example:

      soragen export runs/dit my-model --weights-dtype bfloat16 --sampler dpm++ --steps 12

      soragen export Wan-AI/Wan2.1-T2V-1.3B-Diffusers wan13b --weights-dtype bfloat16
    """
    from soragen.core.atomic import undo_new_folders
    from soragen.io.model_folder import check_export_target, family, load_model, model_sources, save_model
    from soragen.pipeline import DTYPES
    if weights_dtype not in DTYPES:
        raise UsageError(f"unknown --weights-dtype {weights_dtype!r}; choose {', '.join(DTYPES)}")
    _check_overrides(sampler=sampler, steps=steps, guidance=guidance)
    check_export_target(out, force, [model.resolve()] if model.exists() else [])  # before anything is fetched
    sources = model_sources(model)
    check_export_target(out, force, sources)
    loaded = load_model(model)
    overrides = {k: v for k, v in (("sampler", sampler), ("steps", steps), ("guidance", guidance)) if v is not None}
    sampling = dataclasses.replace(loaded.sampling, **overrides)
    scheduler = {k: v for k, v in loaded.scheduler_config.items() if not k.startswith("_")}
    check_export_target(out, force, sources)  # again: the folder may have changed while the model loaded
    try:
        with undo_new_folders(out.parent):
            save_model(out, loaded.dit, loaded.vae, loaded.text_spec, loaded.video, scheduler, sampling,
                       dit_dtype=DTYPES[weights_dtype], family_name=family(loaded).name)
    except OSError as err:  # a full disk, a folder made read-only meanwhile: nothing half-written is left
        raise SoragenError(f"cannot write {out}: {err.strerror or err}") from err
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    typer.echo(f"wrote {out} ({size / 2**20:.1f} MiB; {sampling.sampler} {sampling.steps} steps, "
               f"guidance {sampling.guidance:g})")


@command("eval")
def evaluate(
    model: Annotated[Optional[Path], typer.Option(help="Model folder (default: the built-in model).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="A JSONL prompt set (prompt, background, color, shape, "
                                                    "direction); default: the packaged eval set.")] = None,
    prompt_set: Annotated[str, typer.Option("--set", help="Packaged prompt set: eval or heldout.")] = "eval",
    out: Annotated[Optional[Path], typer.Option(help="Folder to keep the videos and results in.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the model's).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim, dpm++ or unipc (default: the model's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the first video; video i uses seed + i.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Judge the VAE's round trip of each prompt's "
                                              "rendered clip instead of generating: the ceiling for the DiT.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object.")] = False,
) -> None:
    """Score a model on the shapes world: generate a video per prompt and read back background, colour,
    shape and motion from the pixels.

    Examples:

      soragen eval

      soragen eval --set heldout --out eval-heldout/ --json

      soragen eval --reconstruct
    """
    from soragen.tools.evaluate import run_eval
    _check_overrides(sampler=sampler, steps=steps, guidance=guidance)
    results = run_eval(_model_dir(model), prompts, prompt_set, out, limit, steps, sampler, guidance, seed,
                       device, dtype, progress_factory=StageProgress, compile=compile, reconstruct=reconstruct)
    if as_json:
        typer.echo(json.dumps(results))
        return
    from rich.console import Console
    from rich.table import Table
    denoise = results["stage_seconds"].get("denoise", 0.0)
    what = "VAE round trips of rendered clips" if reconstruct else "prompts"
    console = Console()
    # A line of its own: as the table's title it wrapped onto three lines over two narrow columns.
    console.print(f"shapes-world eval: {results['prompts']} {what}, {results['seconds']:.0f}s"
                  + ("" if reconstruct else f" ({denoise:.0f}s denoising)"))
    table = Table()
    table.add_column("attribute")
    table.add_column("accuracy", justify="right")
    for key, value in results["scores"].items():
        table.add_row(key, f"{100 * value:.1f}%")
    console.print(table)
    wrong = [(a, mistake, n) for a, counts in results["mistakes"].items() for mistake, n in counts.items()]
    if wrong:
        table = Table(title="mistakes (asked -> judged)")
        for column in ("attribute", "mistake", "videos"):
            table.add_column(column, justify="right" if column == "videos" else "left")
        for a, mistake, n in sorted(wrong, key=lambda w: -w[2])[:MISTAKE_ROWS]:
            table.add_row(a, mistake, str(n))
        console.print(table)


# ---- entry point -------------------------------------------------------------------------------

def main() -> None:
    from soragen.core.runtime import keep_freed_memory
    keep_freed_memory()  # glibc keeps freed memory for the next step (soragen.core.runtime)
    code = run(sys.argv[1:])
    # Leaving: move every object into the permanent generation, so that the interpreter's last
    # garbage collection skips the millions that torch, transformers and diffusers create (an exit
    # then takes a fraction of the time). Atexit handlers and module teardown still run as usual.
    import gc
    gc.freeze()
    sys.exit(code)


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(ClickException, Exit, Abort) classes of the click that typer runs on: typer >= 0.2x ships its
    own copy as `typer._click`, whose classes are not click's; older typers use click itself."""
    errors, exits, aborts = [], [typer.Exit], [typer.Abort]
    try:
        from typer._click.exceptions import ClickException
        errors.append(ClickException)
    except ImportError:
        pass
    try:
        import click
        errors.append(click.ClickException)
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(errors), tuple(exits), tuple(aborts)


def run(argv: list[str]) -> int:
    """Run the CLI; every error becomes one line on stderr and an exit code (2: usage, 1: other)."""
    click_errors, click_exits, click_aborts = _click_exceptions()
    debug = "--debug" in argv or bool(os.environ.get("SORAGEN_DEBUG"))
    try:
        result = app(args=argv, prog_name="soragen", standalone_mode=False)
        code = result if isinstance(result, int) else 0  # non-standalone click returns Exit's code
    except click_exits as e:
        code = e.exit_code
    except click_errors as e:  # bad options: click's message on one line, exit 2
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `soragen`: the message is the help
            if e.format_message().strip():
                e.show()
        else:
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {(e.format_message().splitlines() or [''])[0]}{hint}", err=True)
        code = e.exit_code
    except click_aborts:
        typer.echo("aborted", err=True)
        code = 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    except SoragenError as e:
        if debug:
            raise
        typer.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        code = e.exit_code
    except Exception as e:  # a bug or an environment problem we did not foresee: still one line
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        typer.echo(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", err=True)
        code = 1
    return code
