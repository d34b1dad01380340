"""Atomic file writes: a reader (or a crash) never sees half a file under the final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.config.errors import NonFiniteError

if TYPE_CHECKING:  # imported where used: the commands' --help and config errors start without torch
    import torch
    from PIL import Image


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; on success fsync it and rename it to `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and some writers, safetensors among them) make files owner-only: give it the
        # mode any new file gets, so an export can be shared like the user's other files.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success fsync its files and rename it to `path`.

    `path` may exist only if empty, or with `replace=True` (the old folder goes once the new one is
    in place). On failure the temp folder is removed and `path` is as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp (and safetensors, for files) make them owner-only
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())
                with open(file, "rb") as written:
                    os.fsync(written.fileno())
        old = None
        if path.is_dir() and any(path.iterdir()):
            if not replace:
                raise FileExistsError(f"{path} exists and is not empty")
            old = path.rename(path.with_name(f".{path.name}.old-{tmp.name}"))
        elif path.is_dir():
            path.rmdir()
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    import safetensors.torch

    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse to write weights holding NaN/inf (`where` says what was about to be written)."""
    import torch

    bad = [
        name
        for name, value in tensors.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        raise NonFiniteError(f"{where}: {len(bad)} weights hold NaN/inf (e.g. {bad[0]}); nothing was written")
