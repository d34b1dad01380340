"""Scanning the data before any model loads: the usable records, the size each trains at, and the
images held out for validation. The data report and the data module are both made from a scan."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from finetune.config.errors import ConfigError, DataError
from finetune.config.values import check_values
from finetune.data.buckets import buckets_for, target_size
from finetune.data.masks import ALPHA
from finetune.data.records import ImageRecord, ScanResult, Skipped
from finetune.data.source_settings import check_source_settings, source_views
from finetune.data.sources import find_records

Size = tuple[int, int]


@dataclass
class DataScan:
    """What a scan found. `result` holds the usable records and every skipped, fixed and uncaptioned
    file; `sizes[i]` is record i's training size; `holdout` the (record, size) pairs kept out."""

    result: ScanResult
    sizes: list[Size]
    holdout: list[tuple[ImageRecord, Size]] = field(default_factory=list)

    @property
    def records(self) -> list[ImageRecord]:
        return list(self.result.records)

    def drop(self, indices: set[int], reasons: list[Skipped]) -> None:
        """Remove records found unusable after the scan (by the cache pre-pass), with their reasons."""
        keep = [i for i in range(len(self.sizes)) if i not in indices]
        self.result.records = [self.result.records[i] for i in keep]
        self.result.skipped += reasons
        self.sizes = [self.sizes[i] for i in keep]


def check_data_config(cfg: Any) -> None:
    """The data settings on their own: choices, ranges and combinations, in one line naming the key."""
    check_values(cfg, section="data")
    check_source_settings(cfg)
    if cfg.buckets:
        buckets_for(cfg)  # raises if the bucket settings leave no bucket
    if cfg.holdout and cfg.streaming:
        raise ConfigError("data.holdout: not available with data.streaming — set data.holdout=0")
    masks = getattr(cfg, "masks", None)
    if masks and cfg.streaming:
        raise ConfigError("data.masks: not available with data.streaming — set data.masks=null")
    if masks and str(masks) != ALPHA and (cfg.sources or cfg.source != "folder"):
        # Mask files are found by the image's path relative to data.path, which only that layout has.
        raise ConfigError(
            "data.masks: a folder of masks pairs with a single data.path folder — with data.sources "
            "or data.source=hf use data.masks=alpha"
        )


def scan_data(cfg: Any, seed: int) -> DataScan:
    """Check the config, find and screen the records, pick each one's size, hold some out.

    A stream is not scanned (it has no end): it is opened, so that a wrong name or column fails now
    rather than in a worker after the models load, and its rows are checked as they come.
    """
    check_data_config(cfg)
    if cfg.streaming:
        from finetune.data.streaming import StreamingCaptionedImages

        StreamingCaptionedImages(cfg, None, seed).open()
        return DataScan(ScanResult(records=[], notes=[f"streaming '{cfg.name}': counts unknown"]), [])
    result = find_records(cfg)
    views = source_views(cfg)  # a source may train at its own resolution
    scan = DataScan(result, [target_size(views[record.source], *record.size) for record in result.records])
    return _hold_out(scan, cfg.holdout, seed)


def _hold_out(scan: DataScan, count: int, seed: int) -> DataScan:
    """Move `count` records, picked by seed, out of training and into `holdout`."""
    if count <= 0:
        return scan
    total = len(scan.sizes)
    if count >= total:
        raise DataError(f"data.holdout: {count} images held out would leave none of {total} to train on")
    chosen = set(random.Random(seed).sample(range(total), count))
    records = scan.result.records
    scan.holdout = [(records[i], scan.sizes[i]) for i in sorted(chosen)]
    scan.result.records = [r for i, r in enumerate(records) if i not in chosen]
    scan.sizes = [s for i, s in enumerate(scan.sizes) if i not in chosen]
    scan.result.notes.append(f"data.holdout: {count} images kept out of training for the validation loss")
    return scan
