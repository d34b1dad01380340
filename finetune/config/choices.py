"""Config values that must be one of a few words."""

from __future__ import annotations

from enum import Enum
from typing import Any

from finetune.config.errors import ConfigError


class Choice(str, Enum):
    """A config value that must be one of a few words: OmegaConf rejects any other when the config is
    composed, naming the key and the choices. Members compare equal to, and print as, their words."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def of(cls, value: Any, key: str) -> Choice:
        """`value` as a member, or one line naming `key` and the choices: for values that did not come
        through a typed config (finetune-generate's options, code that builds configs itself)."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(cls)}") from None
