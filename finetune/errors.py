"""Errors the user can fix: printed as one line, without a traceback."""


class FinetuneError(Exception):
    """Base class for problems in the user's config or data."""


class ConfigError(FinetuneError):
    """A config value is wrong or a combination is impossible."""


class DataError(FinetuneError):
    """The dataset cannot be read or is unusable."""
