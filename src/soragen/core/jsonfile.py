"""JSON from a model folder, an adapter or a run: data from elsewhere, read with limits.

    config = read_json(folder / "config.json")      # SoragenError: "<file> nests deeper than 64 levels"

Every JSON file soragen reads is read here: a regular file (a FIFO or a device is refused, never
waited on), at most MAX_BYTES, UTF-8, nested at most MAX_DEPTH levels, and every problem is one
SoragenError naming the file. Python's parser recurses once per level: a file of deeply nested
'[' would otherwise end in a RecursionError far from the file that caused it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from soragen.core.errors import SoragenError

MAX_BYTES = 64 << 20  # the largest JSON a model folder holds is its tokenizer.json
MAX_DEPTH = 64  # configs nest a few levels, a tokenizer.json about six


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "of an unknown kind"


def not_regular(path: Path) -> str | None:
    """What `path` is where it exists but is not a regular file ("a FIFO", "a folder"); else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else _kind(mode)


def read_bytes(path: Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; SoragenError naming the file otherwise.
    Opened without blocking, so a FIFO under a file's name is refused rather than waited on."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SoragenError(f"{path} is missing") from None
    except OSError as err:
        raise SoragenError(f"cannot read {path}: {err.strerror or err}") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SoragenError(f"{path} is {_kind(mode)}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:
            raise SoragenError(f"cannot read {path}: {err.strerror or err}") from err
    if len(data) > max_bytes:
        raise SoragenError(f"{path} is larger than {max_bytes >> 20} MiB: not a file soragen reads")
    return data


def depth(data) -> int:
    """How deeply `data` nests (a scalar 0, [] 1, [[1]] 2), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def parse_json(text: str | bytes, where: str, max_depth: int = MAX_DEPTH):
    """JSON text (from a file, or a string inside one: a safetensors file's metadata) parsed with the
    depth limit; `where` names it in the error."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise SoragenError(f"{where} nests deeper than {max_depth} levels: not a file soragen reads") from None
    except UnicodeDecodeError as err:
        raise SoragenError(f"{where} is not UTF-8 text (byte {err.start})") from None
    except ValueError as err:  # JSONDecodeError, and integers longer than Python converts
        raise SoragenError(f"{where} is not valid JSON: {(str(err).splitlines() or [''])[0]}") from None
    if depth(data) > max_depth:
        raise SoragenError(f"{where} nests deeper than {max_depth} levels: not a file soragen reads")
    return data


def read_json(path: Path, missing: str | None = None, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """The JSON value in the file at `path`, read with the limits above; `missing` (with "{path}")
    says what it means that there is no such file, where that is more than "is missing"."""
    if missing is not None and not os.path.lexists(path):
        raise SoragenError(missing.replace("{path}", str(path)))
    return parse_json(read_bytes(path, max_bytes), str(path), max_depth)


INCOMPLETE = "model folder is incomplete: {path} is missing"  # `missing` for a file every model folder has


def find_key(data, key: str) -> bool:
    """Whether any object nested in `data` has `key` (e.g. "auto_map": a pointer to Python code)."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if key in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False
