"""soragen calibrate-cache and soragen inspect-patches: measuring a model's steps (what MagCache
skips by), and how a model sees a video."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from soragen.cli.app import StageProgress, check_overrides, check_writable, command, model_dir
from soragen.cli.generate import (DeviceOption, DtypeOption, HeightOption, ModelOption, SamplerOption, StepsOption,
                                  WidthOption, _check_choices, _load, _read_prompts)
from soragen.core.config import MAX_SEED
from soragen.core.errors import UsageError


# ---- calibrate-cache ---------------------------------------------------------------------------

@command("calibrate-cache")
def calibrate_cache(
    prompts: Annotated[Path, typer.Option(help="A text file, one prompt per line: the videos to measure on.",
                                          show_default=False)],
    model: ModelOption = None,
    steps: StepsOption = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the model's).")] = None,
    sampler: SamplerOption = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames per video (default: the model's).")] = None,
    height: HeightOption = None,
    width: WidthOption = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Random seed of the first prompt's video.")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Measure the magnitude ratios --cache magcache needs, once per model: saved as magcache.json in
    the model's folder (a hub model's, or the built-in one's, in ~/.cache/soragen/magcache/).

    Examples:

      soragen calibrate-cache --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt
    """
    from soragen.io.cache_file import calibration_file, check_replaceable
    from soragen.io.folders import resolve_model_dir
    from soragen.tools.calibrate_cache import calibrate
    lines = _read_prompts(prompts)
    check_overrides(steps=steps, guidance=guidance, sampler=sampler, frames=frames)
    _check_choices(device=device, dtype=dtype)
    folder = resolve_model_dir(model_dir(model))
    target = calibration_file(folder)
    check_replaceable(target)
    check_writable(target.parent)
    pipe, _ = _load(model, device, dtype, False, False, [])
    settings = pipe.sampling(steps=steps, guidance=guidance, sampler=sampler)
    size = pipe.video_size(frames, height, width)
    with StageProgress() as bars:
        ratios = calibrate(pipe, lines, *size, settings, seed, bars)
    from soragen.io.cache_file import write_calibration
    write_calibration(target, ratios, dict(model=str(folder), sampler=settings.sampler, steps=settings.steps,
                                           guidance=settings.guidance, prompts=len(lines),
                                           video=dict(zip(("frames", "height", "width"), size))))
    where = "into the model's folder" if target.parent == folder.resolve() else "into soragen's cache"
    typer.echo(f"wrote {target} ({where}): {len(ratios)} row(s) of {settings.steps} ratios from {len(lines)} "
               f"prompt(s); use it with: soragen generate ... --cache magcache")


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
    check_overrides(frames=frames)
    out = out or Path(f"{video.stem}.patches.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the picture is a .png")
    check_writable(out.parent)
    loaded = load_model(model_dir(model))
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
