"""The command line as a shell user writes it: `key=~/folder` reaches the config as the home path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from finetune.config.command_line import expand_home_paths


def test_a_home_path_after_a_key_is_expanded_and_quoted_and_nothing_else_changes(monkeypatch) -> None:
    monkeypatch.setenv("HOME", "/home/me")
    assert expand_home_paths(["data.path=~/photos", "+prior.path=~/class dogs", "resume=~"]) == [
        "data.path='/home/me/photos'",
        "+prior.path='/home/me/class dogs'",  # quoted in the shell, whose quotes are gone by now
        "resume='/home/me'",
    ]
    sources = "data.sources=[{path: ~/style, weight: 2}, {source: hf, name: ~/reg}]"
    assert expand_home_paths([sources, "validation.conditioning_images=[~/a.png,~/b c.png]"]) == [
        "data.sources=[{path: '/home/me/style', weight: 2}, {source: hf, name: '/home/me/reg'}]",
        "validation.conditioning_images=['/home/me/a.png','/home/me/b c.png']",
    ]
    untouched = ["-m", "method.rank=4,16", "data.path=/data/x", "prompt='~/x'", "data.path=~/a,~/b", "--cfg"]
    untouched += ["data.sources=[{path: '~/s'}]", "prompt=a ~ b", "validation.prompts=[a ~b, ~ c]"]
    assert expand_home_paths(untouched) == untouched


@pytest.mark.parametrize("module", ["finetune.train", "finetune.data_tool", "finetune.generate"])
def test_each_command_reads_a_home_path_where_hydra_alone_fails_to_parse_it(
    tmp_path: Path, module: str
) -> None:
    key = "adapter" if module == "finetune.generate" else "data.path"
    done = subprocess.run(
        [sys.executable, "-m", module, f"{key}=~/my style", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert (printed["adapter"] if key == "adapter" else printed["data"]["path"]) == f"{tmp_path}/my style"
