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


def run_command(command: Callable[[Any], Any], cfg: Any) -> None:
    """Run a console command: our own errors are one line on stderr and exit status 2, no traceback."""
    try:
        command(cfg)
    except FinetuneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
