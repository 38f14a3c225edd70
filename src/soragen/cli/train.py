"""soragen train and soragen train-vae: their options (one per config field), progress bars and runs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from soragen.cli.app import command, default_cache, stderr
from soragen.core.config import MAX_SEED, ConfigError, DiTObjective, LoRAConfig, TrainConfig, VAEObjective
from soragen.core.errors import UsageError
from soragen.core.options import option_error


# ---- training ----------------------------------------------------------------------------------

LABELS = {"scan": "scanning clips", "cache": "encoding latents", "conditions": "image conditions", "train": "training"}


@contextlib.contextmanager
def _train_progress():
    """A progress callback (soragen.core.progress) for a run: a scan/cache bar, then a training bar
    with loss, steps/s and ETA; messages as lines."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from soragen.core.progress import MESSAGE
    console = stderr()
    bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int, note: str = "") -> None:
        if not bars.live.is_started:
            bars.start()
        if stage == MESSAGE:
            console.print(note, soft_wrap=True, highlight=False)  # a path must stay copyable
            return
        if stage not in tasks:  # a resumed run's bar starts where the run stands
            tasks[stage] = bars.add_task(LABELS.get(stage, stage), total=total, completed=done - 1, info="")
        bars.update(tasks[stage], completed=done, total=total, info=note)

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
        return _print_plan(cfg, lora, init, vae, preset, text_encoder, out if resume else None)
    from soragen.core.atomic import undo_new_folders
    with _train_progress() as progress, undo_new_folders(out):  # a failed start leaves no folder
        result = run_train(cfg, objective, out=out, preset=preset, text_encoder=text_encoder, vae=vae,
                           init=init, resume=resume, cache_dir=(cache_dir or default_cache()) if cache else None,
                           windows=windows, device=device, sample_prompts=_sample_prompts(samples), progress=progress,
                           lora=lora, fsdp=fsdp)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"trained to step {result['step']} (last loss {result['loss']:.4f}, "
                   f"{result['skipped_nonfinite']} non-finite steps skipped); model: {out}")


def _print_plan(cfg, lora, init, vae, preset, text_encoder, resumed: Path | None) -> None:
    """--dry-run: the plan of the run (of a resumed run: of its latest checkpoint)."""
    from soragen.train.plan import plan_run
    if resumed is not None:
        from soragen.io.folders import latest_checkpoint
        init = str(latest_checkpoint(resumed) or resumed)
    for line in plan_run(cfg, lora, init, vae, preset, text_encoder).lines():
        typer.echo(line)


def _sample_prompts(path: Optional[Path]) -> list[str]:
    if path is None:
        from soragen.tools.shapes import load_sample_prompts
        return load_sample_prompts()
    if not path.is_file():
        raise UsageError(f"--samples {path}: no such file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


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
    with _train_progress() as progress, undo_new_folders(out):  # a failed start leaves no folder
        result = run_train_vae(cfg, objective, out=out, preset=preset, init=init, resume=resume, device=device,
                               progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"trained the VAE to step {result['step']} (last loss {result['loss']:.4f}); use it with "
                   f"soragen train --vae {out}")
