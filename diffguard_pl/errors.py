"""The errors a user can fix: each names the problem and the fix, and the entry points print it as one
``error:`` line and exit with code 2 (no traceback). Anything else is a bug or a fault of the machine.

``RunInterrupted`` is raised by Ctrl-C or SIGTERM during a run; it says what was kept and how to resume.
This module imports nothing heavy, so ``--help`` and config errors answer before torch is loaded.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error a user can fix from the command line or the config."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with the offending key in the message."""


class DataError(UserError, ValueError):
    """A bad list line or an unreadable image, named with the file and line."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint path that does not exist; the message says how to make it."""


class DamagedCheckpointError(UserError):
    """A model's weights file that exists but cannot be read (truncated, corrupt); the message names the file."""


class MissingDataError(UserError, FileNotFoundError):
    """A data file that the benchmark needs is not on this machine; the message says how to install it."""


class RunInterrupted(UserError):
    """Ctrl-C or SIGTERM: the message says what was kept and whether running the same command resumes."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
