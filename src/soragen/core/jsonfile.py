"""Reading the JSON files of a folder we were handed: one reader, one kind of message."""

from __future__ import annotations

import json
from pathlib import Path

from soragen.core.errors import SoragenError


def read_json(path: Path, missing: str = "model folder is incomplete: {path} is missing"):
    """The object in a JSON file, or SoragenError naming the file: `missing` (with {path}) where
    there is none, "is not valid JSON" where it does not parse."""
    if not path.is_file():
        raise SoragenError(missing.replace("{path}", str(path)))
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SoragenError(f"{path} is not valid JSON: {err}") from err
