"""`--help` of each console command lists the config groups with their YAML choices only: the schemas
stored beside them (model/schema, method/lora_schema …) are no choice a user can make."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CONF_DIR, REPO

COMMANDS = ["finetune.train", "finetune.generate", "finetune.data_tool", "finetune.lora_tool"]


@pytest.fixture(scope="module")
def help_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each command's `--help`, run at once (each spends its seconds importing), from a foreign cwd."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    running = {
        command: subprocess.Popen(
            [sys.executable, "-m", command, "--help"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in COMMANDS
    }
    texts = {}
    for command, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        texts[command] = out
    return texts


def listed_groups(help_text: str) -> dict[str, list[str]]:
    """The `group: a, b` lines between `== Configuration groups ==` and `== Config ==`."""
    section = help_text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = {}
    for line in section.splitlines():
        if ": " in line and not line.startswith("Compose"):
            group, choices = line.split(": ", 1)
            groups[group] = choices.split(", ")
    return groups


def yaml_choices() -> dict[str, list[str]]:
    """What a user can pick: the YAML files of each group folder in conf/ (conf/hydra/ configures
    Hydra itself: our --help)."""
    return {
        folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
        for folder in sorted(CONF_DIR.iterdir())
        if folder.is_dir() and folder.name != "hydra"
    }


def test_help_lists_the_yaml_choices_of_each_group_and_no_schema(help_texts: dict[str, str]) -> None:
    # One test for all commands: under xdist, parametrised tests would each start every command.
    assert help_texts.keys() == set(COMMANDS)
    for command, text in help_texts.items():
        groups = listed_groups(text)
        assert groups == yaml_choices(), command
        # Spelled out too, so a conf/ scan that found nothing could not pass.
        assert groups["method"] == ["controlnet", "full", "lora"], command
        assert groups["model"] == ["sd15", "sd21", "sdxl", "tiny", "tiny_random"], command
        assert "schema" not in text.split("== Config ==")[0], command
        assert "\n== Config ==\nOverride anything in the config" in text, command  # the rest of Hydra's help
