"""Find the training records of every configured source, mix them by weight, apply the caption policy.

`find_records(cfg)` is the one entry point: folder and Hugging Face sources, alone or several
(`data.sources`), end up as one list of `ImageRecord`s whose headers have been screened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config.errors import DataError
from finetune.config.schema import MissingCaption, Source
from finetune.config.values import config_value
from finetune.data.folder import attach_parallel_conditioning, scan_folder
from finetune.data.hf import find_in_hf
from finetune.data.images import IMAGE_EXTENSIONS
from finetune.data.masks import ALPHA, attach_mask_files
from finetune.data.records import ScanResult, Skipped


def find_records(cfg: Any, screen: bool = True) -> ScanResult:
    """All usable records of `cfg` (a `DataConfig`); raise `DataError` if there are none.

    With `screen`, every image's header is read (size, mode) and bad inputs are skipped or noted;
    without, records come straight from the layout (fast, sizes unknown).
    """
    from finetune.data.screening import screen_records

    sources = list(cfg.sources or [])
    if sources and (config_value(cfg, "path") or config_value(cfg, "name")):
        raise DataError("data.sources: set either data.sources or data.path / data.name, not both")
    result = ScanResult(records=[])
    for number, source in enumerate(sources or [cfg]):
        # Another source's folder inside this one is that source's, not this one's (class images kept
        # in a subfolder of the instance images, say).
        others = [config_value(other, "path") for other in sources if other is not source]
        found = _scan_source(source, [*others, getattr(cfg, "masks", None)])
        prefix = f"{number}:" if len(sources) > 1 else ""
        # A source's own repeats, else data.repeats (which is the source's when data is the source)
        repeats = source.repeats if source.repeats is not None else cfg.repeats
        weight = float(source.weight) * float(repeats)
        if weight <= 0:
            key = f"data.sources[{number}].weight" if sources else "data.weight"
            raise DataError(f"{key}: {weight} must be above 0")
        default = source.default_caption if sources else None  # data.default_caption: the policy's
        # Every loader carries data.max_pixels, so each decode (screening, workers, cache) applies it.
        found.records = [
            r.with_(
                key=prefix + r.key,
                repeats=r.repeats * weight,
                source=number,
                caption=r.caption if r.caption is not None or default is None else default,
            ).with_max_pixels(cfg.max_pixels)
            for r in found.records
        ]
        found.skipped = [Skipped(prefix + s.key, s.reason) for s in found.skipped]
        result.extend(found)
    masks = getattr(cfg, "masks", None)
    if masks and str(masks) != ALPHA:  # a folder: each image's mask file (one folder source, checked)
        attach_mask_files(result, Path(str(masks)).expanduser(), cfg.max_pixels)
    if screen:
        result = screen_records(result, cfg)
    apply_caption_policy(result, cfg.missing_caption, cfg.default_caption)  # on usable images only
    balance_regularisation(result, sources)
    result.log(_describe(cfg))
    if not result.records:
        raise DataError(_nothing_usable(cfg, result))
    return result


def _scan_source(cfg: Any, companions: list[Any]) -> ScanResult:
    """The records of one source; files under `companions` (folders of other sources, masks) are not
    its images."""
    source = config_value(cfg, "source")
    if source == "folder":
        root = _folder_root(cfg)
        found = scan_folder(
            root, list(cfg.caption_extensions), cfg.file_column, cfg.caption_column, cfg.conditioning_column
        )
    elif source == "hf":
        found = find_in_hf(cfg)
    else:
        raise DataError(f"data.source: '{source}' is not one of {', '.join(Source)}")
    if source == "folder":
        _leave_out_companion_folders(found, root, [cfg.conditioning_path, *companions])
    if cfg.conditioning_path:
        attach_parallel_conditioning(found, Path(str(cfg.conditioning_path)).expanduser())
    return found


def _leave_out_companion_folders(found: ScanResult, root: Path, folders: list[Any]) -> None:
    """A conditioning, mask or other source's folder kept inside the data folder holds none of its
    training images: its files are left out of the scan (not skipped as images without a caption or
    mask, nor trained twice)."""
    root = root.resolve()
    inside: list[tuple[str, ...]] = []
    for folder in folders:
        if folder and str(folder) != ALPHA:
            path = Path(str(folder)).expanduser().resolve()
            if path.is_relative_to(root) and path != root:
                inside.append(path.relative_to(root).parts)

    def companion(key: str) -> bool:
        return any(Path(key).parts[: len(parts)] == parts for parts in inside)

    found.records = [record for record in found.records if not companion(record.key)]
    found.skipped = [skipped for skipped in found.skipped if not companion(skipped.key)]


def _folder_root(cfg: Any) -> Path:
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
    return root


def apply_caption_policy(result: ScanResult, policy: str, default: str) -> None:
    """Give records without a caption one (or skip them), as `data.missing_caption` says."""
    policy = MissingCaption.of(policy, "data.missing_caption")
    missing = [record for record in result.records if record.caption is None]
    result.uncaptioned_keys = [record.key for record in missing]
    if not missing:
        return
    if policy == "error":
        examples = ", ".join(record.key for record in missing[:3])
        raise DataError(
            f"data.missing_caption=error: {len(missing)} images have no caption (e.g. {examples}) — "
            "add caption files, or set data.missing_caption=skip|empty|default"
        )
    if policy == "skip":
        result.skipped += [
            Skipped(record.key, "no caption (data.missing_caption=skip)") for record in missing
        ]
        result.records = [record for record in result.records if record.caption is not None]
        return
    caption = default if policy == "default" else ""
    result.records = [r.with_(caption=caption) if r.caption is None else r for r in result.records]
    result.notes.append(
        f"{len(missing)} of {len(result.records)} images have no caption; training them with "
        + (f"the default caption '{caption}'" if caption else "an empty caption")
        + " (data.missing_caption)"
    )


def balance_regularisation(result: ScanResult, sources: list[Any]) -> None:
    """Show the regularisation (`is_reg`) images as often per epoch, together, as the other images, as
    kohya does: repeated when there are fewer of them, a share of them when there are more."""
    regular = {number for number, source in enumerate(sources) if source.is_reg}
    if not regular:
        return
    reg_total = sum(r.repeats for r in result.records if r.source in regular)
    other_total = sum(r.repeats for r in result.records if r.source not in regular)
    if reg_total == 0 or other_total == 0:
        return
    factor = other_total / reg_total
    result.records = [
        record.with_(repeats=record.repeats * factor) if record.source in regular else record
        for record in result.records
    ]
    result.notes.append(
        f"regularisation images: {reg_total:g} samples per epoch scaled to {other_total:g}, as many as the "
        "other images give (data.sources[…].is_reg)"
    )


def _describe(cfg: Any) -> str:
    if cfg.sources:
        return f"{len(cfg.sources)} sources"
    return f"'{config_value(cfg, 'path') or config_value(cfg, 'name')}'"


def _nothing_usable(cfg: Any, result: ScanResult) -> str:
    skipped = f" ({len(result.skipped)} skipped, see warnings)" if result.skipped else ""
    if cfg.sources or config_value(cfg, "source") != "folder":
        return f"data: {_describe(cfg)} gave no usable images{skipped}"
    exts = "/".join(IMAGE_EXTENSIONS)
    return (
        f"data.path: '{config_value(cfg, 'path')}' has no usable images{skipped} — looked for {exts} files "
        f"(any depth) with same-name {'/'.join(cfg.caption_extensions)} captions, or a "
        f"metadata.jsonl/metadata.csv at the top listing '{cfg.file_column}' and "
        f"'{cfg.caption_column}' columns"
    )
