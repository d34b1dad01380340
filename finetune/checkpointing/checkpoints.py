"""Checkpoint files: complete or absent, loaded without running code, and found again by `resume=auto`."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.config.errors import ConfigError
from finetune.config.files import atomic_path

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


class StepBoundary:
    """Callback mixin: `completed_a_step(trainer)` at batch end tells whether this batch finished an
    optimizer step (False mid-accumulation): the only moments a checkpoint is exact."""

    _step_at_batch_start = -1

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def completed_a_step(self, trainer: L.Trainer) -> bool:
        return trainer.global_step != self._step_at_batch_start


class StepCheckpoint(StepBoundary, ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving only at the end of a batch that completed an optimizer step.

    Lightning checks the step count alone: resumed at a multiple of `every_n_train_steps` with
    gradient accumulation, it saved again after the first micro-batch, and a resume from that file
    would skip the micro-batch whose gradient it never held.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.completed_a_step(trainer):
            super().on_train_batch_end(trainer, *args)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """`save_last="link"`: last.ckpt names the newest checkpoint instead of being a second full
        copy of it (tens of GB for a full SDXL fine-tune).

        Lightning's own link is a symlink made after deleting the old one; ours is a hard link (a
        symlink for DeepSpeed's folders) swapped in with one rename, so last.ckpt is never missing,
        and never dangling when `checkpoint.keep_last` deletes the file it named.
        """
        target, link = Path(filepath), Path(linkpath)
        # Already so (POSIX rename between two links to one file does nothing and leaves the source).
        if not trainer.is_global_zero or (link.exists() and link.samefile(target)):
            return
        tmp = link.with_name(f".{link.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        if target.is_dir():
            tmp.symlink_to(target.name, target_is_directory=True)
            if link.is_dir() and not link.is_symlink():  # a folder last.ckpt saved on a signal
                shutil.rmtree(link)
        else:
            os.link(target, tmp)
        os.replace(tmp, link)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (by modification time), or None.

    Candidates are `<run_dir>/checkpoints/*.ckpt` (files, or DeepSpeed's folders) and the
    `hpc_ckpt_*.ckpt` Lightning writes on a SLURM requeue signal. Temp files of an interrupted save
    are never candidates (they are removed); an incomplete one (a file cut short by a full disk, a
    DeepSpeed folder without its final `latest` tag) is skipped with a warning.
    """
    folder = run_dir / "checkpoints"
    for leftover in folder.glob(".*.tmp") if folder.is_dir() else ():
        log.info("resume=auto: removing %s, left by a save that was interrupted", leftover)
        leftover.unlink(missing_ok=True)
    found = [*folder.glob("[!.]*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    found = [path for path in found if path.exists()]  # not a link whose checkpoint was deleted
    for path in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if is_complete(path):
            return path
        log.warning("resume=auto: skipping %s, it is not a complete checkpoint", path)
    return None


def is_complete(path: Path) -> bool:
    """A whole torch archive, or a DeepSpeed checkpoint folder whose save finished: DeepSpeed writes
    the `latest` tag file after every rank's shards."""
    if path.is_dir():
        return (path / "latest").is_file()
    return zipfile.is_zipfile(path)


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """`resume` as a checkpoint path for Lightning: `auto` finds the run's newest (`latest_checkpoint`)."""
    if resume != "auto":
        if resume and not is_complete(Path(resume).expanduser()):
            raise ConfigError(f"resume: '{resume}' is not a complete checkpoint (or use resume=auto)")
        if not resume and latest_checkpoint(run_dir) is not None:
            # A fresh run here would write over the checkpoints of the one before.
            raise ConfigError(
                f"resume: the run folder {run_dir} holds another run's checkpoints — continue it with "
                "resume=auto, or start in a new folder (hydra.run.dir=...)"
            )
        return resume
    found = latest_checkpoint(run_dir)
    if found is None:
        log.info("resume=auto: no checkpoint in %s; starting from the beginning", run_dir)
        return None
    log.info("resume=auto: continuing from %s", found)
    return str(found)
