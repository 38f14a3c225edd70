"""soragen make-dataset, export and eval: data, model folders and scores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from soragen.cli.app import COMPILE_HELP, StageProgress, check_overrides, command, model_dir, stderr
from soragen.cli.generate import DeviceOption, DtypeOption, StepsOption
from soragen.core.config import MAX_SEED
from soragen.core.errors import SoragenError, UsageError

MISTAKE_ROWS = 8  # soragen eval lists this many of its most frequent mistakes


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
    with Progress(console=stderr(), transient=True) as bars:
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
    check_overrides(sampler=sampler, steps=steps, guidance=guidance)
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
                       dit_dtype=DTYPES[weights_dtype], family_name=family(loaded).name,
                       image_inputs=loaded.image_inputs, dit_2=loaded.dit_2, boundary=loaded.boundary,
                       image_encoder=loaded.image_encoder)
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
    steps: StepsOption = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim, dpm++ or unipc (default: the model's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the first video; video i uses seed + i.")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
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
    check_overrides(sampler=sampler, steps=steps, guidance=guidance)
    results = run_eval(model_dir(model), prompts, prompt_set, out, limit, steps, sampler, guidance, seed,
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
