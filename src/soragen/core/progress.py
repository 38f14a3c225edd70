"""How long work tells whoever shows it (the CLI's bars) how far it has got: one protocol for
generation and training alike.

    progress(stage, done, total)          a bar: `done` of `total` of `stage` ("denoise", "scan", "train")
    progress(stage, done, total, note)    the same with a short note beside it (training's loss)
    progress("message", 0, 0, text)       a line to print (a path stays copyable)

Work never prints; with no callback it reports to nobody.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[..., None]
MESSAGE = "message"


def quiet(stage: str, done: int, total: int, note: str = "") -> None:
    """The callback of work that nobody watches."""
