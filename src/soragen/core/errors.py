"""The two kinds of error the CLI turns into a one-line message and an exit code."""


class SoragenError(Exception):
    """A problem with the user's files, models or machine: exit code 1."""

    exit_code = 1


class UsageError(SoragenError):
    """A bad option value or combination: exit code 2."""

    exit_code = 2
