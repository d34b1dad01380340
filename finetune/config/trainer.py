"""The `trainer` group's schema: one field per `lightning.Trainer` argument, typed from Lightning's own
annotations where OmegaConf can check them.

Reading those annotations means importing Lightning, and with it torch: seconds that every command's
`--help` and every config error found while composing would wait for. So the arguments are recorded
in `trainer_args.json` with the Lightning version they were read from, and read from Lightning itself
only when another version is installed. `python -m finetune.config.trainer` records them again.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import json
import typing
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal, Union

RECORDED = Path(__file__).with_name("trainer_args.json")
# Trainer arguments we construct ourselves rather than take from the config.
_TRAINER_ARGS_OWNED_BY_US = {"self", "logger", "callbacks", "plugins"}
_PRIMITIVES = {"bool": bool, "int": int, "float": float, "str": str}
# Values a config can give that no primitive type describes: such a field stays untyped (Any).
_UNTYPED = (list, dict, datetime.timedelta)


@dataclass(frozen=True)
class TrainerArgument:
    """One `lightning.Trainer` argument as the config sees it."""

    name: str
    types: tuple[str, ...] | None  # the primitive types OmegaConf checks (bool, int, float, str); None: Any
    optional: bool  # may be null
    default: str | int | float | bool | None

    def config_type(self) -> Any:
        if self.types is None:
            return Any
        typed = Union[tuple(_PRIMITIVES[name] for name in self.types)]  # noqa: UP007 (built at run time)
        return typing.Optional[typed] if self.optional else typed  # noqa: UP045


def trainer_schema() -> type:
    """A dataclass with one field per `lightning.Trainer` argument, defaults as Lightning's, so that
    `trainer.max_steps=ten` fails when the config is composed."""
    arguments = recorded_arguments() or trainer_arguments()
    fields = [(a.name, a.config_type(), field(default=a.default)) for a in arguments]
    return make_dataclass("TrainerConfig", fields)


def trainer_arguments() -> list[TrainerArgument]:
    """The arguments of the installed `lightning.Trainer`, from its signature (imports Lightning)."""
    import lightning as L

    arguments = []
    for name, parameter in inspect.signature(L.Trainer.__init__).parameters.items():
        if name in _TRAINER_ARGS_OWNED_BY_US:
            continue
        default = parameter.default
        if not isinstance(default, (str, int, float, bool, type(None))):
            default = None
        types, optional = _config_types(parameter.annotation, default)
        arguments.append(TrainerArgument(name, types, optional, default))
    return arguments


def _config_types(annotation: Any, default: Any) -> tuple[tuple[str, ...] | None, bool]:
    """The types OmegaConf can check for a Trainer annotation: its primitive alternatives (a Literal
    counts as its values' types, a Path as str; objects such as an Accelerator cannot come from a
    config, so they drop out), or None (Any) where a list of devices or a timedelta is one of them;
    and whether it may be null."""
    options = set()
    for option in typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,):
        if typing.get_origin(option) is Literal:
            options |= {type(value) for value in typing.get_args(option)}
        else:
            options.add(typing.get_origin(option) or option)
    if any(isinstance(option, type) and issubclass(option, _UNTYPED) for option in options):
        return None, True
    if Path in options:
        options.add(str)
    kept = tuple(name for name, kind in _PRIMITIVES.items() if kind in options)
    if not kept:
        return None, True
    return kept, type(None) in options or default is None


def lightning_version() -> str | None:
    try:
        return importlib.metadata.version("lightning")
    except importlib.metadata.PackageNotFoundError:
        return None


def recorded_arguments(path: Path = RECORDED) -> list[TrainerArgument] | None:
    """The arguments recorded for the installed Lightning version; None for any other version."""
    recorded = json.loads(path.read_text())
    if recorded["lightning"] != lightning_version():
        return None
    return [
        TrainerArgument(
            a["name"], None if a["types"] is None else tuple(a["types"]), a["optional"], a["default"]
        )
        for a in recorded["arguments"]
    ]


def record_arguments(path: Path = RECORDED) -> None:
    """Write the installed Lightning's arguments to `path` (after updating Lightning)."""
    arguments = [
        json.dumps(
            {"name": a.name, "types": a.types and list(a.types), "optional": a.optional, "default": a.default}
        )
        for a in trainer_arguments()
    ]
    lines = ",\n  ".join(arguments)  # one argument a line: a Lightning update reads as a short diff
    path.write_text(f'{{"lightning": "{lightning_version()}", "arguments": [\n  {lines}\n]}}\n')


if __name__ == "__main__":
    record_arguments()
    print(f"recorded lightning {lightning_version()}'s Trainer arguments in {RECORDED}")
