"""Atomic writes: the final file appears whole, with the mode any other new file would get."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config.files import atomic_path, save_safetensors


def test_written_file_has_the_umask_mode_and_no_temp_left(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors", {"k": "v"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("before")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
