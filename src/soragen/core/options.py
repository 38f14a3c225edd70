"""Checks of command-line values that more than one command makes, each with one message."""

from __future__ import annotations

from soragen.core.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def option_error(err: Exception, renames: dict[str, str] | None = None) -> UsageError:
    """A ConfigError about a field (soragen.core.config), as a usage error about the option that
    sets it (`renames`: fields whose option is named otherwise)."""
    name = getattr(err, "field", "")
    option = "--" + (renames or {}).get(name, name).replace("_", "-")
    return UsageError(f"{option} {str(err)[len(name) + 1:]}" if name else str(err))


def check_device_name(name: str) -> None:
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose auto, cpu or cuda")


def check_multiple(name: str, value: int, multiple: int, high: int | None = None) -> None:
    """--NAME must be a multiple of `multiple` (and between it and `high`, where given)."""
    if value % multiple == 0 and (high is None or multiple <= value <= high):
        return
    nearest = max(multiple, int(round(value / multiple)) * multiple)
    if high is None:
        raise UsageError(f"--{name} must be a multiple of {multiple}; nearest valid value: {nearest}")
    raise UsageError(f"--{name} must be a multiple of {multiple} between {multiple} and {high}; "
                     f"nearest valid value: {min(nearest, high // multiple * multiple)}")
