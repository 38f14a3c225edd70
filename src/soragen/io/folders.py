"""Where a --model points: the package's own model, a run's latest checkpoint, a hub id's snapshot."""

from __future__ import annotations

import re
from pathlib import Path

from soragen.core.errors import SoragenError
from soragen.core.hub import fetch
from soragen.families.registry import family_of

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def default_model_dir() -> Path | None:
    """The model shipped inside the package, if this install has it."""
    folder = Path(__file__).parents[1] / "weights" / "default"
    return folder if (folder / "soragen.json").is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint-STEP folder (complete = has soragen.json)."""
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "soragen.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def resolve_model_dir(path: str | Path) -> Path:
    """The folder a --model names: a soragen model folder, a training run's latest checkpoint, a
    folder a family recognises (a diffusers pipeline folder), or a hub id of one, fetched."""
    path = Path(path)
    if not path.exists():
        if HUB_ID_RE.match(str(path)) and str(path).count("/") == 1 and not str(path).startswith("."):
            return fetch(str(path), ["*.json", "*.safetensors", "*.model", "*.txt"])
        raise SoragenError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise SoragenError(f"model {path} is not a folder")
    if (path / "soragen.json").is_file() or family_of(path, None) is not None:
        return path
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise SoragenError(f"{path} is not a soragen model folder (no soragen.json) nor a run with a "
                           f"complete checkpoint")
    return checkpoint
