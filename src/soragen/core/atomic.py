"""Outputs appear whole or not at all: write under a hidden temporary name, then rename into place.

    with atomic_path(Path("out/video.mp4"), suffix=".mp4") as tmp:   # out/.video.mp4.tmp-PID.mp4
        write(tmp)
    # now out/video.mp4 is the complete file; on an error the temporary is gone

A rename within one folder is atomic, so a reader (or a crash) sees the old output or the new one,
never half of one. A folder that already exists is swapped with its replacement in one step
(Linux's renameat2 with RENAME_EXCHANGE) where the system has it; elsewhere the old one is moved
aside first, which leaves a moment without either. A process killed with SIGKILL cannot clean up,
so every write first sweeps its folder for temporaries of processes that no longer exist.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# .NAME.tmp-PID[SUFFIX]: a temporary being written; .NAME.old-PID: an old output being replaced
_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:\.[A-Za-z0-9]+)?$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging(target: Path, suffix: str = "") -> Path:
    """The hidden temporary beside `target` that this process writes it under."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}{suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def remove(path: Path) -> None:
    """A file or a folder, whichever `path` is; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def sweep(folder: Path) -> list[Path]:
    """Remove the temporaries that killed processes left in `folder`; returns what was removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER_RE.match(entry.name)
        if match and not _alive(int(match.group("pid"))):
            remove(entry)
            removed.append(entry)
    return removed


def fsync_tree(root: Path) -> None:
    """Flush a file, or every file below a folder, so a crash after the rename cannot leave a
    complete-looking but empty output."""
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def publish(tmp: Path, target: Path, exchange: bool = True) -> None:
    """Move the complete `tmp` onto `target`, replacing what is there. A file replaces a file in
    one rename; a folder replaces a folder by an exchange (or, without one, by moving the old
    folder aside first), and the old one is removed after."""
    fsync_tree(tmp)
    if not tmp.is_dir() or not target.exists():
        os.replace(tmp, target)
        return
    if exchange and _exchange(tmp, target):
        remove(tmp)  # holds the old folder now
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    remove(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    remove(old)


@contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write `target` under (a file, or a folder the caller makes), published
    onto `target` when the block ends without an error and removed when it does not."""
    target = Path(target)
    sweep(target.parent)
    tmp = staging(target, suffix)
    remove(tmp)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        remove(tmp)
        raise


@contextmanager
def undo_new_folders(path: Path) -> Iterator[None]:
    """On an error in the block, remove the folders from `path` up that did not exist before it and
    are still empty (deepest first): a command that fails leaves no empty folder behind."""
    missing = []
    folder = Path(path).absolute()
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty: something was written there; leave it and those above
                break
        raise
