"""The captions of a training data folder, in the Hugging Face video-folder layout.

* ``metadata.jsonl`` or ``metadata.csv`` at the root, with a ``file_name``
  column (relative to the root) and a ``text`` column;
* a ``.txt`` file beside a clip with the same stem (``clip.mp4`` -> ``clip.txt``),
  which wins over the metadata when both give a caption.

Malformed metadata raises SoragenError naming the file and line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from soragen.core.errors import SoragenError

__all__ = ["METADATA_NAMES", "captions_for"]

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")  # read in this order; later wins


def _clean_caption(text: str) -> str:
    return " ".join(text.split())


def _metadata_error(path: Path, line: int, message: str) -> SoragenError:
    return SoragenError(f"malformed caption file {path}, line {line}: {message}")


def _caption_key(root: Path, path: Path, line: int, file_name: object, text: object) -> tuple[Path, str]:
    if not isinstance(file_name, str) or not file_name.strip():
        raise _metadata_error(path, line, "'file_name' must be a non-empty string")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise _metadata_error(path, line, "'text' must be a string")
    rel = file_name.strip().replace("\\", "/")
    if rel.startswith("/"):
        raise _metadata_error(path, line, f"'file_name' must be relative to the folder, got {file_name!r}")
    return root / rel, _clean_caption(text)


def _read_jsonl(root: Path, path: Path) -> dict[Path, str]:
    captions: dict[Path, str] = {}
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _metadata_error(path, lineno, f"invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise _metadata_error(path, lineno, "expected a JSON object per line")
                if "file_name" not in row:
                    raise _metadata_error(path, lineno, "no 'file_name' field")
                if "text" not in row:
                    raise _metadata_error(path, lineno, "no 'text' field")
                key, text = _caption_key(root, path, lineno, row["file_name"], row["text"])
                captions[key] = text
    except UnicodeDecodeError:
        raise SoragenError(f"malformed caption file {path}: not UTF-8 text") from None
    except OSError as e:
        raise SoragenError(f"cannot read caption file {path}: {e.strerror or e}") from None
    return captions


def _read_csv(root: Path, path: Path) -> dict[Path, str]:
    captions: dict[Path, str] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader, None)
                if header is None:
                    return captions
                header = [h.strip() for h in header]
                for column in ("file_name", "text"):
                    if column not in header:
                        raise _metadata_error(
                            path, reader.line_num, f"no '{column}' column in the header {header}"
                        )
                i_name, i_text = header.index("file_name"), header.index("text")
                for row in reader:
                    if not row or all(not cell.strip() for cell in row):
                        continue
                    if len(row) != len(header):
                        raise _metadata_error(
                            path, reader.line_num, f"expected {len(header)} columns, got {len(row)}"
                        )
                    key, text = _caption_key(root, path, reader.line_num, row[i_name], row[i_text])
                    captions[key] = text
            except csv.Error as e:
                raise _metadata_error(path, reader.line_num, str(e)) from None
    except UnicodeDecodeError:
        raise SoragenError(f"malformed caption file {path}: not UTF-8 text") from None
    except OSError as e:
        raise SoragenError(f"cannot read caption file {path}: {e.strerror or e}") from None
    return captions


def _read_txt_caption(path: Path) -> str:
    try:
        return _clean_caption(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        raise SoragenError(f"cannot read caption file {path}: {e.strerror or e}") from None


def captions_for(root: Path, videos: list[Path]) -> dict[Path, str]:
    """Captions of ``videos`` (found below ``root``), keyed by their paths: the metadata files at
    ``root``, then a non-empty ``.txt`` beside a clip, which wins."""
    captions: dict[Path, str] = {}
    for name in METADATA_NAMES:
        path = root / name
        if path.is_file():
            reader = _read_csv if name.endswith(".csv") else _read_jsonl
            captions.update(reader(root, path))
    for video in videos:
        txt = video.with_suffix(".txt")
        if txt.is_file():
            text = _read_txt_caption(txt)
            if text:  # an empty .txt does not erase a metadata caption
                captions[video] = text
    return captions
