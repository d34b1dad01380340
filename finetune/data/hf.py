"""Records from Hugging Face datasets: a save_to_disk folder, data files or a hub id (`data.source=hf`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.data.folder import resolve_inside
from finetune.data.images import DatasetImage, FileImage
from finetune.data.records import ImageRecord, ScanResult, Skipped
from finetune.data.sources import config_value
from finetune.errors import DataError

# Single data files `datasets` can read directly, by suffix.
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


class DatasetRows(Sequence[ImageRecord]):
    """Records over a dataset's image column, made on access so no image is decoded while scanning."""

    def __init__(self, dataset: Any, column: str, captions: list[str | None], prefix: str) -> None:
        import datasets

        dataset = dataset.select_columns([column])
        if isinstance(dataset.features[column], datasets.Image):
            # Raw bytes/path, decoded by us: the same safe decoding and checks as image files.
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self.column = column
        self.captions = captions
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> ImageRecord:  # type: ignore[override]  # no slices needed
        index = range(len(self))[index]  # normalises negatives and raises IndexError like a list
        key = f"{self.prefix}#{index}"
        return ImageRecord(key, self.captions[index], DatasetImage(self.dataset, self.column, index, key))


def find_in_hf(cfg: Any) -> ScanResult:
    name, split = config_value(cfg, "name"), cfg.split
    if not name:
        raise DataError("data.name is not set — give a hub dataset id or a folder written by save_to_disk")
    dataset, root = load_hf_dataset(str(name), split)
    where = f"'{name}' [{split}]"
    for key in ("image_column", "caption_column"):
        column = getattr(cfg, key)
        if column not in dataset.column_names:
            available = ", ".join(dataset.column_names)
            raise DataError(f"data.{key}: '{column}' not in {where}; available columns: {available}")
    return _hf_records(dataset, cfg.image_column, cfg.caption_column, root, f"{name}[{split}]")


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


def _hf_records(
    dataset: Any, image_column: str, caption_column: str, root: Path | None, prefix: str
) -> ScanResult:
    import datasets

    image_feature, caption_feature = dataset.features[image_column], dataset.features[caption_column]
    if not (isinstance(caption_feature, datasets.Value) and "string" in caption_feature.dtype):
        raise DataError(f"data.caption_column: '{caption_column}' holds {caption_feature}, expected text")
    captions = [" ".join(c.split()) if c is not None else None for c in dataset[caption_column]]
    if isinstance(image_feature, datasets.Image) or (
        isinstance(image_feature, datasets.Value) and "binary" in image_feature.dtype
    ):
        return ScanResult(list(DatasetRows(dataset, image_column, captions, prefix)))
    if not (isinstance(image_feature, datasets.Value) and "string" in image_feature.dtype):
        raise DataError(
            f"data.image_column: '{image_column}' holds {image_feature}, expected images or file paths"
        )
    # A column of file paths: relative ones resolve inside the dataset folder and may not leave it.
    # Absolute ones are accepted, as datasets' own Image feature accepts them.
    result = ScanResult(records=[])
    for index, (value, caption) in enumerate(zip(dataset[image_column], captions, strict=True)):
        key = f"{prefix}#{index}"
        if not value:
            result.skipped.append(Skipped(key, f"empty '{image_column}'"))
            continue
        path, reason = (Path(value), "") if Path(value).is_absolute() else resolve_inside(root, value)
        if path is None or not path.is_file():
            result.skipped.append(Skipped(f"{value} ({key})", reason or "file not found"))
            continue
        result.records.append(ImageRecord(key, caption, FileImage(path)))
    return result
