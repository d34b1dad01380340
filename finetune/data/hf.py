"""Records from Hugging Face datasets: a save_to_disk folder, data files or a hub id (`data.source=hf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config.errors import DataError
from finetune.config.values import config_value
from finetune.data.folder import resolve_inside
from finetune.data.images import DatasetImage, FileImage
from finetune.data.records import ImageRecord, ScanResult, Skipped

# Single data files `datasets` can read directly, by suffix.
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


def find_in_hf(cfg: Any) -> ScanResult:
    name, split = config_value(cfg, "name"), cfg.split
    if not name:
        raise DataError("data.name is not set — give a hub dataset id or a folder written by save_to_disk")
    dataset, root = load_hf_dataset(str(name), split)
    where = f"'{name}' [{split}]"
    for key in ("image_column", "caption_column", "conditioning_column"):
        column = getattr(cfg, key, None)
        if column is not None and column not in dataset.column_names:
            available = ", ".join(dataset.column_names)
            raise DataError(f"data.{key}: '{column}' not in {where}; available columns: {available}")
    return _hf_records(dataset, cfg, root, f"{name}[{split}]")


def load_dataset_args(name: str, split: str) -> tuple[Any, ...]:
    """`load_dataset` arguments for a hub id or folder (format inferred), or one .parquet/.arrow file."""
    local = Path(name).expanduser()
    builder = DATA_FILE_BUILDERS.get(local.suffix.lower()) if local.is_file() else None
    return (builder, None, None, {split: str(local)}) if builder else (name,)


def load_hf_dataset(name: str, split: str) -> tuple[Any, Path | None]:
    """The split as a `datasets.Dataset`, plus the local folder it came from (None for a hub id)."""
    import datasets  # imported here: it is slow to import and folder datasets do not need it

    local = Path(name).expanduser()
    saved = (local / "dataset_dict.json").is_file() or (local / "state.json").is_file()
    try:
        # save_to_disk folders need load_from_disk; anything else load_dataset.
        if saved:
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(*load_dataset_args(name, split), split=split)
    except Exception as error:  # datasets raises many types (network, format, missing split): report them all
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"data.name: cannot load '{name}' split '{split}': {message}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"data.split: '{split}' not in '{name}'; available splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded, (local if local.is_dir() else None)


def _hf_records(dataset: Any, cfg: Any, root: Path | None, prefix: str) -> ScanResult:
    import datasets

    caption_feature = dataset.features[cfg.caption_column]
    if not (isinstance(caption_feature, datasets.Value) and "string" in caption_feature.dtype):
        raise DataError(f"data.caption_column: '{cfg.caption_column}' holds {caption_feature}, expected text")
    captions = [" ".join(c.split()) if c is not None else None for c in dataset[cfg.caption_column]]
    images = _column_images(dataset, cfg.image_column, "image_column", root, prefix)
    conditioning = cfg.conditioning_column
    conditions = (
        _column_images(dataset, conditioning, "conditioning_column", root, prefix) if conditioning else None
    )
    result = ScanResult(records=[])
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        key = f"{prefix}#{index}"
        condition = conditions[index] if conditions is not None else None
        if isinstance(image, str) or isinstance(condition, str):
            why = image if isinstance(image, str) else f"conditioning image: {condition}"
            result.skipped.append(Skipped(key, why))
            continue
        result.records.append(ImageRecord(key, caption, image, conditioning=condition))
    return result


def _column_images(dataset: Any, column: str, key: str, root: Path | None, prefix: str) -> list[Any]:
    """A loader per row of an image column (embedded images or file paths), or why that row has none."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.Value) and "binary" in feature.dtype
    ):
        raw = dataset.select_columns([column])
        if isinstance(feature, datasets.Image):
            # Raw bytes/path, decoded by us: the same safe decoding and checks as image files.
            raw = raw.cast_column(column, datasets.Image(decode=False))
        return [DatasetImage(raw, column, index, f"{prefix}#{index}") for index in range(len(raw))]
    if not (isinstance(feature, datasets.Value) and "string" in feature.dtype):
        raise DataError(f"data.{key}: '{column}' holds {feature}, expected images or file paths")
    # File paths: relative ones resolve inside the dataset folder and may not leave it. Absolute
    # ones are accepted, as datasets' own Image feature accepts them.
    loaders: list[Any] = []
    for value in dataset[column]:
        if not value:
            loaders.append(f"empty '{column}'")
            continue
        path, reason = (Path(value), "") if Path(value).is_absolute() else resolve_inside(root, value)
        loaders.append(
            FileImage(path)
            if path is not None and path.is_file()
            else f"{value}: {reason or 'file not found'}"
        )
    return loaders
