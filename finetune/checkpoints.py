"""Checkpoint files: complete or absent, loaded without running code, and found again by `resume=auto`."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from finetune.errors import ConfigError
from finetune.files import atomic_path

log = logging.getLogger(__name__)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with two guarantees for local files.

    Saving goes to a temp name in the same folder, is fsync'ed, then renamed: a run killed mid-write
    leaves the previous checkpoints and no half file under a checkpoint's name. Loading uses
    `torch.load(weights_only=True)`: tensors and plain containers only, so a crafted file cannot run
    code; `allow_unsafe_pickle=True` is the explicit opt-out for checkpoints that need more.
    """

    def __init__(self, allow_unsafe_pickle: bool = False) -> None:
        self.allow_unsafe_pickle = allow_unsafe_pickle

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction-based save
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if self.allow_unsafe_pickle:
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ConfigError(
                f"resume: {path} needs arbitrary unpickling to load, which could run code from the file; "
                "refused. If you trust it, set allow_unsafe_pickle=true"
            ) from error


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` (by modification time), or None.

    Temp files of an interrupted save are never candidates; a file that is not a complete torch
    archive (e.g. cut short by a full disk) is skipped with a warning.
    """
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.glob("*.ckpt") if not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    for path in candidates:
        if zipfile.is_zipfile(path):
            return path
        log.warning("resume=auto: skipping %s, it is not a complete checkpoint", path)
    return None


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """`resume` as a checkpoint path for Lightning: `auto` finds the newest in `<run_dir>/checkpoints`."""
    if resume != "auto":
        if resume and not Path(resume).expanduser().is_file():
            raise ConfigError(f"resume: '{resume}' is not a checkpoint file (or use resume=auto)")
        return resume
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        log.info("resume=auto: no checkpoint in %s/checkpoints; starting from the beginning", run_dir)
        return None
    log.info("resume=auto: continuing from %s", found)
    return str(found)
