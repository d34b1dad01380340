"""Errors the user can fix: printed as one line, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class FinetuneError(Exception):
    """Base class for problems in the user's config or data."""


class ConfigError(FinetuneError):
    """A config value is wrong or a combination is impossible."""


class DataError(FinetuneError):
    """The dataset cannot be read or is unusable."""


class ExportExistsError(FinetuneError, FileExistsError):
    """The export directory already holds files and `overwrite` was not asked for."""


class NonFiniteError(FinetuneError):
    """Training produced NaN/inf values too many times in a row, or was about to save them."""


class TrainingInterrupted(FinetuneError):
    """A signal stopped training after a checkpoint was saved; the exit status tells which signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_command(command: Callable[[Any], Any], cfg: Any) -> None:
    """Run a console command: our own errors are one line on stderr and exit status 2, no traceback
    (a run stopped by a signal exits 128 + the signal's number, as the shell reports it)."""
    try:
        command(cfg)
    except FinetuneError as error:
        if isinstance(error, TrainingInterrupted):
            print(str(error), file=sys.stderr)
            sys.exit(error.exit_code)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
