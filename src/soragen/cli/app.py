"""What every command shares: the typer app, option checks, progress bars, and the entry point that
turns every error into one line and an exit code."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # for the import time that generate --timings reports

import functools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from soragen import __version__  # noqa: E402
from soragen.core.errors import SoragenError, UsageError  # noqa: E402
from soragen.core.options import option_error  # noqa: E402

app = typer.Typer(
    name="soragen",
    help="Text to video with a Sora-style diffusion transformer (DiT), hackable and fast on a CPU.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_debug = False
COMPILE_HELP = ("torch.compile the DiT: tens of seconds of compiling per video size the first time, a few once torch "
                "has cached it, then faster steps; pays off over many videos.")


def stderr():
    from rich.console import Console
    return Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"soragen {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
) -> None:
    global _debug
    _debug = debug


# ---- shared bits -------------------------------------------------------------------------------

def command(*args, **kwargs):
    """app.command(), with every number option checked finite before the command runs: click takes
    "nan" and "inf" for a float, and a NaN guidance scale would make an all-black video."""
    def register(func):
        @functools.wraps(func)
        def checked(**params):
            for name, value in params.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise UsageError(f"--{name.replace('_', '-')} must be a finite number, not {value}")
            return func(**params)
        return app.command(*args, **kwargs)(checked)
    return register


def check_overrides(**options) -> None:
    """Options that override a model's defaults pass the checks the model's own values pass
    (soragen.core.config's SamplingDefaults and VideoDefaults), before anything is loaded."""
    from soragen.core.config import ConfigError, SamplingDefaults, VideoDefaults
    for cls in (SamplingDefaults, VideoDefaults):
        names = {f for f in cls.__dataclass_fields__}
        try:
            cls(**{k: v for k, v in options.items() if k in names and v is not None})
        except ConfigError as err:
            raise option_error(err) from None


def check_text(text: str, what: str) -> None:
    """Text from argv that was not valid UTF-8 arrives with surrogate escapes; no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(text[err.start])
        raise UsageError(f"{what} is not valid UTF-8 text (byte 0x{byte - 0xDC00 if byte >= 0xDC00 else byte:02x} "
                         f"at character {err.start})") from None


def model_dir(model: Optional[Path]) -> Path:
    from soragen.io.folders import default_model_dir
    if model is not None:
        return model
    default = default_model_dir()
    if default is None:
        raise UsageError("no --model given and this install has no default model; pass --model DIR")
    return default


def default_cache() -> Path:
    """~/.cache/soragen, or under $XDG_CACHE_HOME where that is set."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "soragen"


def check_writable(path: Path) -> None:
    """Fail before the long work if the output cannot be written."""
    parent = path if path.is_dir() else path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoragenError(f"cannot write to {path}: {err.strerror or err}") from err
    if not os.access(parent, os.W_OK):
        raise SoragenError(f"cannot write to {path}: {parent} is not writable")


class StageProgress:
    """Rich progress bars for the pipeline's (stage, done, total) callbacks."""

    def __init__(self, label: str = ""):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from soragen.pipeline import StageTimes
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=stderr(), transient=True)
        self.label, self.tasks = label, {}
        self.times = StageTimes(self._show)

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        self.times(stage, done, total)

    def _show(self, stage: str, done: int, total: int, note: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(f"{self.label}{stage}", total=total)
        self.bars.update(self.tasks[stage], completed=done, total=total)


def note_emulated_bf16(console, device, dtype) -> None:
    """bf16 asked for on a CPU that only emulates it: it runs (torch's own kernels), but slowly."""
    import torch
    from soragen.models.fast_paths import has_fast_bf16
    if device.type == "cpu" and dtype == torch.bfloat16 and not has_fast_bf16():
        console.print("note: this CPU has no bf16 matmul units (AVX512-BF16 or AMX): bfloat16 runs through "
                      "torch's emulated kernels, slower than float32 (--dtype auto picks float32 here)")


# ---- entry point -------------------------------------------------------------------------------

def main() -> None:
    from soragen.core.runtime import keep_freed_memory
    keep_freed_memory()  # glibc keeps freed memory for the next step (soragen.core.runtime)
    code = run(sys.argv[1:])
    # Leaving: move every object into the permanent generation, so that the interpreter's last
    # garbage collection skips the millions that torch, transformers and diffusers create (an exit
    # then takes a fraction of the time). Atexit handlers and module teardown still run as usual.
    import gc
    gc.freeze()
    sys.exit(code)


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(ClickException, Exit, Abort) classes of the click that typer runs on: typer >= 0.2x ships its
    own copy as `typer._click`, whose classes are not click's; older typers use click itself."""
    errors, exits, aborts = [], [typer.Exit], [typer.Abort]
    try:
        from typer._click.exceptions import ClickException
        errors.append(ClickException)
    except ImportError:
        pass
    try:
        import click
        errors.append(click.ClickException)
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(errors), tuple(exits), tuple(aborts)


def run(argv: list[str]) -> int:
    """Run the CLI; every error becomes one line on stderr and an exit code (2: usage, 1: other)."""
    from soragen.core.runtime import quiet_torchao
    quiet_torchao()
    click_errors, click_exits, click_aborts = _click_exceptions()
    debug = "--debug" in argv or bool(os.environ.get("SORAGEN_DEBUG"))
    try:
        result = app(args=argv, prog_name="soragen", standalone_mode=False)
        code = result if isinstance(result, int) else 0  # non-standalone click returns Exit's code
    except click_exits as e:
        code = e.exit_code
    except click_errors as e:  # bad options: click's message on one line, exit 2
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `soragen`: the message is the help
            if e.format_message().strip():
                e.show()
        else:
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {(e.format_message().splitlines() or [''])[0]}{hint}", err=True)
        code = e.exit_code
    except click_aborts:
        typer.echo("aborted", err=True)
        code = 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    except SoragenError as e:
        if debug:
            raise
        typer.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        code = e.exit_code
    except Exception as e:  # a bug or an environment problem we did not foresee: still one line
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        typer.echo(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", err=True)
        code = 1
    return code
