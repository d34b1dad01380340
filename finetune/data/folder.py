"""Records from a folder: caption sidecars (any depth, kohya repeat folders) or an imagefolder metadata file.

Scanning never decodes an image; `screening.py` reads headers afterwards.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from finetune.config.errors import DataError
from finetune.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, FileImage
from finetune.data.records import Fixed, ImageRecord, ScanResult, Skipped

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# kohya's layout: <repeats>_<name>/ folders at the top of the dataset, e.g. "10_zkz style".
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def scan_folder(
    root: Path,
    caption_extensions: list[str],
    file_column: str,
    caption_column: str,
    conditioning_column: str | None = None,
) -> ScanResult:
    """The records of one dataset folder, in either layout (a metadata file wins if present)."""
    metadata = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(metadata) > 1:
        raise DataError(f"data.path: '{root}' has both {' and '.join(METADATA_FILES)} — keep only one")
    if metadata:
        return scan_metadata(root, metadata[0], file_column, caption_column, conditioning_column)
    if conditioning_column:
        raise DataError(f"data.conditioning_column: '{root}' has no metadata file to hold that column")
    return scan_sidecars(root, caption_extensions)


def attach_parallel_conditioning(result: ScanResult, folder: Path) -> None:
    """Give each record the image of the same relative name (any image extension) under `folder`."""
    if not folder.is_dir():
        raise DataError(f"data.conditioning_path: '{folder}' is not a directory")
    attach_parallel(result, folder, "conditioning", "conditioning image", "")


def attach_parallel(
    result: ScanResult, folder: Path, field: str, what: str, why: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> None:
    """Set each record's `field` to the image of the same relative name (any image extension) under
    `folder`; a record without one is skipped, the reason naming `what` is missing (and `why`)."""
    kept = []
    for record in result.records:
        found = parallel_file(folder, record.key)
        if found is None:
            stem = Path(record.key).with_suffix("")
            result.skipped.append(Skipped(record.key, f"no {what} {stem}.* in {folder}{why}"))
            continue
        kept.append(record.with_(**{field: FileImage(found, max_pixels)}))
    result.records = kept


def parallel_file(folder: Path, key: str) -> Path | None:
    """The file of `key`'s relative name, with any image extension, inside `folder`; None if none."""
    stem = Path(key).with_suffix("")
    for ext in (*IMAGE_EXTENSIONS, *(ext.upper() for ext in IMAGE_EXTENSIONS)):
        found, _ = resolve_inside(folder, f"{stem}{ext}")
        if found is not None:
            return found
    return None


def scan_sidecars(
    root: Path, caption_extensions: list[str] | tuple[str, ...] = (".txt", ".caption")
) -> ScanResult:
    """Images anywhere under `root`, each captioned by a same-name sidecar file beside it.

    Top-level folders named `<repeats>_<name>` (kohya) repeat their images `repeats` times per epoch,
    and their images without a sidecar are captioned by `<name>`, as kohya's trainer does.
    """
    result = ScanResult(records=[])
    real_root = root.resolve()
    for directory, names in walk(root, result):
        relative = directory.relative_to(root)
        repeats, folder_caption = _kohya_folder(relative)
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
            sidecar = next((stem + e for e in caption_extensions if stem + e in present), None)
            caption = folder_caption
            if sidecar is not None:
                try:
                    caption = read_caption(directory / sidecar, key, result)
                except OSError as error:
                    result.skipped.append(Skipped(key, f"caption file {sidecar} is unreadable: {error}"))
                    continue
            result.records.append(ImageRecord(key, caption, FileImage(path), repeats=repeats))
    return result


def _kohya_folder(relative: Path) -> tuple[float, str | None]:
    """(repeats, caption for uncaptioned images) of a folder, from its top-level kohya name if any."""
    if not relative.parts or not (match := KOHYA_FOLDER.match(relative.parts[0])):
        return 1.0, None
    return float(match.group(1)), match.group(2).strip()


def read_caption(path: Path, key: str, result: ScanResult) -> str:
    """A caption file's text. Not UTF-8 (old Windows tools write cp1252) is decoded anyway and noted."""
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return _clean(raw.decode(encoding))
        except UnicodeDecodeError:
            pass
    try:
        text, encoding = raw.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "latin-1"  # never fails: every byte is a character
    result.fixed.append(Fixed(key, f"caption {path.name} is not UTF-8; read as {encoding}"))
    return _clean(text)


def _clean(text: str) -> str:
    return " ".join(text.replace("\x00", "").split())


def scan_metadata(
    root: Path, metadata: Path, file_column: str, caption_column: str, conditioning_column: str | None = None
) -> ScanResult:
    """Rows of metadata.jsonl/metadata.csv naming image files relative to `root` (HF imagefolder style)."""
    rows, columns, result = _read_metadata(metadata)
    needed = [("data.file_column", file_column), ("data.caption_column", caption_column)]
    if conditioning_column:
        needed.append(("data.conditioning_column", conditioning_column))
    for key, column in needed:
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
            conditioning = None
            if conditioning_column:
                conditioning, why = resolve_inside(root, str(row.get(conditioning_column) or ""))
                if conditioning is None:
                    result.skipped.append(Skipped(f"{value} ({where})", f"conditioning image: {why}"))
                    continue
            listed.add(path.resolve())
            text = _clean(caption) if caption is not None else None
            loader = FileImage(conditioning) if conditioning else None
            result.records.append(ImageRecord(value, text, FileImage(path), conditioning=loader))
    unlisted = sum(
        1
        for directory, names in walk(root)
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


def walk(root: Path, result: ScanResult | None = None) -> Iterator[tuple[Path, list[str]]]:
    """Yield (directory, sorted file names) under `root`, skipping hidden files and folders.

    Linked folders are followed while they stay inside `root` (each real folder once, so link loops
    end); a folder that links outside is reported in `result` and not entered.
    """
    real_root = root.resolve()
    seen: set[Path] = set()
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(directory)
        seen.add(here.resolve())
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = (here / name).resolve()
            if not real.is_relative_to(real_root):
                if result is not None:
                    key = (here / name).relative_to(root).as_posix() + "/"
                    result.skipped.append(Skipped(key, "folder links outside the dataset root"))
            elif real not in seen:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        yield here, sorted(name for name in filenames if not name.startswith("."))
