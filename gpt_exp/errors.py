"""The errors a user can fix, and the exit codes they end with: printed as one `error:` line by gpt_exp/cli.py.

Everything else that raises is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # a mistake in the config, the data or the files: the line names the fix
EXIT_DIVERGED = 3  # the loss or gradient norm turned NaN or inf
EXIT_SWEEP_FAILED = 1  # a sweep whose jobs did not all complete (each failed job said why)


class UserError(Exception):
    """Something the user can fix: printed as one line naming the fix at the entry point, never a traceback."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError, ValueError):
    """A value in the configuration that cannot work."""


class DataError(UserError):
    """A problem with the user's corpus (missing, empty, not UTF-8, too short) or its cache."""


class Diverged(UserError):
    """The loss or gradient norm became NaN or inf: the run stops; its last checkpoint stays the last good state."""

    exit_code = EXIT_DIVERGED


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to `limit` characters: what a one-line report quotes."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


class Finished(UserError):
    """A resume or requeue of a run that has trained all its steps: it says so, changes nothing and exits 0."""

    exit_code = 0
