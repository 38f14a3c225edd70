"""Where MagCache's calibration of a model lives (`soragen calibrate-cache` writes it, `generate
--cache magcache` reads it), and its reading and writing.

In the model's own folder, as magcache.json beside its weights (a soragen model folder, a run's
checkpoint, a local diffusers folder), except where that folder is not the user's to write in:
a hub id's snapshot in the hub cache (shared, content-addressed: a file added there belongs to no
revision) and the model shipped inside the package. Those are calibrated into soragen's cache,
$XDG_CACHE_HOME/soragen/magcache/ (~/.cache/soragen/magcache/), a file per folder. A file of that
name that calibrate-cache did not write is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from soragen.core.errors import SoragenError

NAME = "magcache.json"
MARK = "soragen calibrate-cache"  # what a file this module wrote says in its "written_by"


def in_hub_cache(folder: Path) -> bool:
    """A hub snapshot: .../models--ORG--NAME/snapshots/REVISION."""
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")


def calibration_file(folder: Path) -> Path:
    """Where the calibration of the model in `folder` (a resolved model folder) is kept."""
    from soragen.io.folders import default_model_dir
    folder = Path(folder).resolve()
    builtin = default_model_dir()
    if in_hub_cache(folder) or (builtin is not None and folder == builtin.resolve()):
        label = folder.parent.parent.name if in_hub_cache(folder) else folder.name
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "soragen" / "magcache"
        return base / f"{label}-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}.json"
    return folder / NAME


def read_calibration(folder: Path, model: str) -> tuple[tuple[float, ...], ...]:
    """The ratios (a row each: the conditional pass, the unconditional) calibrated for the model in
    `folder`; SoragenError in one line saying how to calibrate where there are none."""
    from soragen.core.jsonfile import read_json
    path = calibration_file(folder)
    if not path.exists():
        raise SoragenError(f"--cache magcache needs this model's magnitude ratios and {path} does not exist: "
                           f"calibrate it once with: soragen calibrate-cache --model {model} --prompts PROMPTS.txt")
    data = read_json(path)
    ratios = data.get("ratios") if isinstance(data, dict) else None
    if (not isinstance(ratios, list) or not 1 <= len(ratios) <= 2 or
            not all(isinstance(r, list) and 1 <= len(r) <= 10_000 and all(_ratio(v) for v in r) for r in ratios)):
        raise SoragenError(f"{path}: not a calibration soragen calibrate-cache wrote (its ratios are missing or "
                           f"out of range); remove it and calibrate again")
    return tuple(tuple(float(v) for v in r) for r in ratios)


def _ratio(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1e6


def check_replaceable(path: Path) -> None:
    """SoragenError where `path` holds a file calibrate-cache did not write (the user's)."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = path.is_file() and not path.is_symlink() and json.loads(path.read_text()).get("written_by") == MARK
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SoragenError(f"{path} exists and is not a calibration soragen wrote; it is left as it is (move it "
                           f"away to calibrate this model)")


def write_calibration(path: Path, ratios: list[list[float]], settings: dict) -> None:
    """Write the ratios (and the settings they were measured at) to `path`, whole or not at all."""
    from soragen.core.atomic import atomic_path
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps({"written_by": MARK, **settings, "ratios": ratios}, indent=1) + "\n")
