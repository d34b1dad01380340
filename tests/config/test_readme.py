"""What the README offers composes: each command of its code blocks (and of the configs' header
comments), and each `key=value` it names inline,
is a config the commands accept (keys that exist, group choices that exist, values of the right type or
choice). Placeholders (`<folder>`, `…`, `N`) are checked for their key only."""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache

import pytest
import yaml
from conftest import CONF_DIR, REPO
from omegaconf import OmegaConf

from finetune.config.command_line import expand_home_paths
from finetune.config.values import check_values

README = (REPO / "README.md").read_text(encoding="utf-8")
# The command-line tools and the config each composes (finetune-lora's first word is `command=<word>`).
CONFIGS = {"finetune-train": "train", "finetune-data": "data_tool", "finetune-generate": "generate"}
CONFIGS["finetune-lora"] = "lora_tool"
PLACEHOLDER = re.compile(r"[<>…*]|^N$")
OVERRIDE = re.compile(r"^(\+?)([a-z_][a-z_0-9]*(?:\.[a-z_0-9]+)*)=(.*)$")
# Spelled out as examples of syntax, not settings: Hydra's own keys and the generic form.
NOT_SETTINGS = ("hydra.", "key=")


@cache
def compose(config: str, overrides: tuple[str, ...]):
    """The config `config` composes with `overrides`, as its command does; a bad key or value raises."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import finetune.train  # noqa: F401  (registers the config schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config, overrides=list(overrides))


def composes(config: str, overrides: tuple[str, ...]) -> bool:
    try:
        cfg = compose(config, overrides)
        check_values(cfg)
    except Exception:  # any refusal: the caller reports which override and config
        return False
    return True


def documented_commands() -> list[tuple[str, list[str]]]:
    """(tool, its arguments) for each command line of the README's code blocks and of the examples
    in the configs' header comments (`#   finetune-train experiment=…`)."""
    lines = []
    for body in re.findall(r"```\w*\n(.*?)```", README, re.S):
        lines += body.replace("\\\n", " ").splitlines()
    for config in sorted(CONF_DIR.rglob("*.yaml")):
        lines += [line.lstrip("# ") for line in config.read_text(encoding="utf-8").splitlines()]
    found = []
    for line in lines:
        if line.split()[:1] and line.split()[0] in CONFIGS:
            words = shlex.split(re.sub(r"<[^>]*>", "placeholder", line), comments=True)
            found.append((words[0], expand_home_paths(words[1:])))  # as the commands read them
    return found


def inline_overrides() -> list[str]:
    """Every `key=value` of the README's inline code, `a|b` alternatives apart; in a row of the config
    table (a row that starts with a group's name) a bare key is that group's."""
    found = []
    for line in README.splitlines():
        row = re.match(r"^\| `([a-z_]+)` ", line)
        for span in re.findall(r"`([^`\n]+)`", line):
            try:
                words = shlex.split(span.replace("\\|", "|"))
            except ValueError:  # a fragment of a longer value (an unclosed quote)
                continue
            for word in words:
                match = OVERRIDE.match(word)
                if not match or word.startswith(NOT_SETTINGS):
                    continue
                _, key, values = match.groups()
                if row and "." not in key and key != row.group(1):
                    key = f"{row.group(1)}.{key}"
                found += [f"{key}={value}" for value in values.split("|") if value or "." not in key]
    return sorted(set(found))


def group_choices(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml") if path.stem != "default")


def first_of_sweep(word: str) -> str:
    """`key=a,b` of a `-m` sweep → `key=a` (Hydra runs each value)."""
    key, _, value = word.partition("=")
    return f"{key}={value.split(',')[0]}" if "[" not in value else word


@pytest.mark.parametrize("tool, words", documented_commands(), ids=lambda value: str(value)[:60])
def test_each_documented_command_composes(tool: str, words: list[str]) -> None:
    if tool == "finetune-lora":
        words = [f"command={words[0]}", *words[1:]]
    if "-m" in words:
        words = [first_of_sweep(word) for word in words if word != "-m"]
    assert composes(CONFIGS[tool], tuple(words)), f"{tool} {' '.join(words)}"


def test_each_inline_setting_names_a_key_and_a_value_some_config_accepts() -> None:
    """An inline `key=value` holds with a command's defaults, or with masks on, or with one choice of its
    key's group (e.g. `method.lora_rank` with method=controlnet); `group=choice` names a file of conf/."""
    overrides = inline_overrides()
    assert len(overrides) > 80  # the README's settings were found
    refused = [override for override in overrides if not _accepted(*override.split("=", 1))]
    assert not refused, f"README settings no command accepts: {refused}"


def _accepted(key: str, value: str) -> bool:
    if (CONF_DIR / key).is_dir():  # a group: each choice named is a file of it
        choices = yaml.safe_load(value) if value and not PLACEHOLDER.search(value) else []
        return all((CONF_DIR / key / f"{choice}.yaml").is_file() for choice in _as_list(choices))
    section = key.split(".")[0]
    contexts = [(), ("data.masks=alpha",)]  # the masked-training options need masks on
    if "." in key and (CONF_DIR / section).is_dir():
        contexts += [(f"{section}={choice}",) for choice in group_choices(section)]
    placeholder = PLACEHOLDER.search(value) or not value
    for config in CONFIGS.values():
        for context in contexts:
            try:
                cfg = compose(config, context)
            except Exception:  # e.g. data.masks for finetune-generate, which has no data
                continue
            if _has_key(cfg, key) and (placeholder or _takes(cfg, key, value)):
                return True
    return False


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list) else [value]


def _has_key(cfg, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return node is not None and OmegaConf.is_dict(node) and leaf in node


def _takes(cfg, key: str, value: str) -> bool:
    """Whether the composed `cfg` takes `value` at `key`: its type, its choices, its range."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    trial = copy.deepcopy(cfg)
    try:  # the value as the command reads it: home paths expanded, then Hydra's grammar
        (override,) = OverridesParser.create().parse_overrides(expand_home_paths([f"{key}={value}"]))
        OmegaConf.update(trial, key, override.value(), merge=True)  # as Hydra applies an override
        check_values(trial)
    except Exception:  # any refusal
        return False
    return True
