"""Find the training records — (image loader, caption) pairs — in a folder or a Hugging Face dataset.

Scanning never decodes an image (too slow for big datasets); decode problems surface at training time
and are handled by the dataset. Everything that cannot be used is reported as a `Skipped` entry.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from finetune.data.images import IMAGE_EXTENSIONS, FileImage
from finetune.errors import DataError

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SOURCES = ("folder", "hf")
# Skips logged one by one; the rest are summarised (all of them stay in `ScanResult.skipped`).
MAX_LOGGED_SKIPS = 20


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One training example. `key` names it in warnings and is stable enough to key a cache on."""

    key: str
    caption: str
    load: Callable[[], Image.Image]  # returns an upright RGB image or raises ImageDecodeError


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str


@dataclass
class ScanResult:
    records: Sequence[ImageRecord]
    skipped: list[Skipped] = field(default_factory=list)
    uncaptioned: int = 0  # records that got an empty caption because none was given
    notes: list[str] = field(default_factory=list)

    def log(self, where: str) -> None:
        """Report skips and missing captions as warnings, so nothing is dropped silently."""
        for note in self.notes:
            log.warning(note)
        for skip in self.skipped[:MAX_LOGGED_SKIPS]:
            log.warning("skipped %s: %s", skip.key, skip.reason)
        if len(self.skipped) > MAX_LOGGED_SKIPS:
            log.warning("... and %d more skipped", len(self.skipped) - MAX_LOGGED_SKIPS)
        if self.uncaptioned:
            log.warning(
                "%d of %d images in %s have no caption; training them with an empty caption",
                self.uncaptioned,
                len(self.records),
                where,
            )
        log.info("found %d images in %s (%d skipped)", len(self.records), where, len(self.skipped))


def find_records(cfg: Any) -> ScanResult:
    """Scan the source named by `cfg.source` (a `DataConfig`); raise `DataError` if it is unusable."""
    source = config_value(cfg, "source")
    if source == "folder":
        return _find_in_folder(cfg)
    if source == "hf":
        from finetune.data.hf import find_in_hf

        return find_in_hf(cfg)
    raise DataError(f"data.source: '{source}' is not one of {', '.join(SOURCES)}")


def _find_in_folder(cfg: Any) -> ScanResult:
    raw = config_value(cfg, "path")
    if not raw:
        raise DataError(
            "data.path is not set — point it at a folder of images with .txt captions "
            "or a metadata.jsonl/metadata.csv (e.g. data.path=~/my_style)"
        )
    root = Path(str(raw)).expanduser()
    if not root.exists():
        raise DataError(
            f"data.path: '{raw}' does not exist — check the path (relative paths start at {Path.cwd()})"
        )
    if not root.is_dir():
        raise DataError(f"data.path: '{raw}' is not a directory — give the folder that holds the images")
    metadata = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(metadata) > 1:
        raise DataError(f"data.path: '{raw}' has both {' and '.join(METADATA_FILES)} — keep only one")
    if metadata:
        result = scan_metadata(root, metadata[0], cfg.file_column, cfg.caption_column)
    else:
        result = scan_sidecars(root)
    result.log(f"'{raw}'")
    if not result.records:
        exts = "/".join(IMAGE_EXTENSIONS)
        skipped = f" ({len(result.skipped)} skipped, see warnings)" if result.skipped else ""
        raise DataError(
            f"data.path: '{raw}' has no usable images{skipped} — looked for {exts} files (any depth) with "
            f"same-name .txt captions, or a metadata.jsonl/metadata.csv at the top listing "
            f"'{cfg.file_column}' and '{cfg.caption_column}' columns"
        )
    return result


def scan_sidecars(root: Path) -> ScanResult:
    """Images anywhere under `root`, each captioned by the same-name .txt file beside it."""
    result = ScanResult(records=[])
    real_root = root.resolve()
    for directory, names in _walk(root):
        present = set(names)
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = directory / name
            key = path.relative_to(root).as_posix()
            if not path.resolve().is_relative_to(real_root):
                result.skipped.append(Skipped(key, "links outside the dataset root"))
                continue
            caption = ""
            if stem + ".txt" in present:
                try:
                    caption = (directory / (stem + ".txt")).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as error:
                    result.skipped.append(Skipped(key, f"caption file {stem}.txt is unreadable: {error}"))
                    continue
            else:
                result.uncaptioned += 1
            result.records.append(ImageRecord(key, caption, FileImage(path)))
    return result


def scan_metadata(root: Path, metadata: Path, file_column: str, caption_column: str) -> ScanResult:
    """Rows of metadata.jsonl/metadata.csv naming image files relative to `root` (HF imagefolder style)."""
    rows, columns, result = _read_metadata(metadata)
    for key, column in (("data.file_column", file_column), ("data.caption_column", caption_column)):
        if column not in columns:
            available = ", ".join(sorted(columns)) or "none"
            raise DataError(f"{key}: '{column}' not in {metadata.name}; available columns: {available}")
    listed: set[Path] = set()
    for where, row in rows:
        value = row.get(file_column)
        if not isinstance(value, str) or not value.strip():
            result.skipped.append(Skipped(where, f"no '{file_column}' value"))
            continue
        path, reason = resolve_inside(root, value)
        caption = row.get(caption_column)
        if path is None:
            result.skipped.append(Skipped(f"{value} ({where})", reason))
        elif caption is not None and not isinstance(caption, str):
            result.skipped.append(Skipped(f"{value} ({where})", f"'{caption_column}' is not text"))
        else:
            result.uncaptioned += caption is None
            listed.add(path.resolve())
            result.records.append(ImageRecord(value, (caption or "").strip(), FileImage(path)))
    unlisted = sum(
        1
        for directory, names in _walk(root)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        and (directory / name).resolve() not in listed
    )
    if unlisted:
        result.notes.append(
            f"{unlisted} images under '{root}' are not listed in {metadata.name} and are not used"
        )
    return result


def _read_metadata(metadata: Path) -> tuple[list[tuple[str, dict]], set[str], ScanResult]:
    """Parse the metadata file into (where, row) pairs and the set of column names seen."""
    result = ScanResult(records=[])
    rows: list[tuple[str, dict]] = []
    columns: set[str] = set()
    try:
        # utf-8-sig: spreadsheet programs often write a byte-order mark at the start of CSV files.
        with metadata.open(encoding="utf-8-sig", newline="") as handle:
            if metadata.suffix == ".csv":
                reader = csv.DictReader(handle)
                columns.update(reader.fieldnames or [])
                rows = [(f"{metadata.name} line {reader.line_num}", row) for row in reader]
                return rows, columns, result
            for number, line in enumerate(handle, start=1):
                where = f"{metadata.name} line {number}"
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    result.skipped.append(Skipped(where, f"invalid JSON: {error}"))
                    continue
                if not isinstance(row, dict):
                    result.skipped.append(Skipped(where, "not a JSON object"))
                    continue
                columns.update(row)
                rows.append((where, row))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"data.path: cannot read {metadata}: {error}") from error
    return rows, columns, result


def resolve_inside(root: Path | None, value: str) -> tuple[Path | None, str]:
    """`root / value` if it is an existing file inside `root`, else (None, why it was refused)."""
    path = Path(value)
    if root is None:
        return (path, "") if path.is_file() else (None, "file not found")
    if path.is_absolute():
        return None, "absolute path refused — paths must be relative to the dataset root"
    path = root / path
    if not path.resolve().is_relative_to(root.resolve()):
        return None, "path escapes the dataset root"
    if not path.is_file():
        return None, "file not found"
    return path, ""


def _walk(root: Path):
    """Yield (directory, sorted file names) under `root`, skipping hidden files and folders."""
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        yield Path(directory), sorted(name for name in filenames if not name.startswith("."))


def config_value(cfg: Any, key: str) -> Any:
    """`cfg.key`, with an unset Hydra value (`???`) read as None so we can explain it ourselves."""
    try:
        return getattr(cfg, key)
    except MissingMandatoryValue:
        return None
