"""The `trainer` group's schema: one field per `lightning.Trainer` argument, typed from Lightning's own
annotations where OmegaConf can check them."""

from __future__ import annotations

import datetime
import inspect
import typing
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Literal, Union

# Trainer arguments we construct ourselves rather than take from the config.
_TRAINER_ARGS_OWNED_BY_US = {"self", "logger", "callbacks", "plugins"}


def trainer_schema() -> type:
    """A dataclass with one field per `lightning.Trainer` argument, defaults as Lightning's, typed
    from Lightning's own annotations where OmegaConf can check them (`trainer.max_steps=ten` then
    fails when the config is composed)."""
    import lightning as L

    fields = []
    for name, parameter in inspect.signature(L.Trainer.__init__).parameters.items():
        if name in _TRAINER_ARGS_OWNED_BY_US:
            continue
        default = parameter.default
        if not isinstance(default, (str, int, float, bool, type(None))):
            default = None
        fields.append((name, _config_type(parameter.annotation, default), field(default=default)))
    return make_dataclass("TrainerConfig", fields)


_PRIMITIVES = (bool, int, float, str)
# Values a config can give that no primitive type describes: such a field stays untyped (Any).
_UNTYPED = (list, dict, datetime.timedelta)


def _config_type(annotation: Any, default: Any) -> Any:
    """The type OmegaConf can check for a Trainer annotation: its primitive alternatives (a Literal
    counts as its values' types, a Path as str; objects such as an Accelerator cannot come from a
    config, so they drop out), or Any where a list of devices or a timedelta is one of them."""
    options = set()
    for option in typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,):
        if typing.get_origin(option) is Literal:
            options |= {type(value) for value in typing.get_args(option)}
        else:
            options.add(typing.get_origin(option) or option)
    if any(isinstance(option, type) and issubclass(option, _UNTYPED) for option in options):
        return Any
    if Path in options:
        options.add(str)
    kept = tuple(option for option in _PRIMITIVES if option in options)
    if not kept:
        return Any
    typed = Union[kept]  # noqa: UP007 (a type built at run time: Union[(int,)] is int)
    optional = type(None) in options or default is None
    return typing.Optional[typed] if optional else typed  # noqa: UP045
