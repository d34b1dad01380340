"""The one record type every data source produces, and what a scan found: records, skips and fixes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from PIL import Image

log = logging.getLogger(__name__)

# Skips and fixes logged one by one; the rest are summarised (all of them stay in the ScanResult).
MAX_LOGGED = 20


class ImageSource(Protocol):
    """Where one image comes from: a file or a dataset row. Must pickle (workers receive records).

    Implementations are frozen dataclasses; `max_pixels` (data.max_pixels) travels with them.
    """

    max_pixels: int  # images with more pixels are refused, by `header()` and by decoding

    def __call__(self, convert: Callable[[Image.Image], Any] = ...) -> Any:
        """The decoded image, upright RGB (or what `convert` makes of the opened image, for the alpha
        channel too); raises ImageDecodeError."""

    def header(self) -> Image.Image:
        """The image opened lazily (size and mode only, no pixels decoded); raises ImageDecodeError."""

    def ends(self, tail: int) -> tuple[bytes, bytes, int] | None:
        """(first bytes, last `tail` bytes, size) of the encoded image, None if it is not encoded."""

    def fingerprint(self) -> str:
        """A hash of the image's bytes: changes whenever its content does."""


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One training example. `key` names it in reports and is unique within its source."""

    key: str
    caption: str | None  # None: the source gives no caption (data.missing_caption decides)
    load: ImageSource
    # How many times one epoch shows it: kohya folder repeats times the source's weight (may be
    # fractional; the sampler draws the remainder).
    repeats: float = 1.0
    size: tuple[int, int] | None = None  # (width, height) once screened, after EXIF rotation
    conditioning: ImageSource | None = None  # ControlNet: the image's conditioning image, when read
    mask: ImageSource | None = None  # data.masks=<folder>: the image's loss mask file
    source: int = 0  # which entry of data.sources it came from (its settings: data.source_settings)

    def with_(self, **changes: Any) -> ImageRecord:
        return replace(self, **changes)

    def with_max_pixels(self, max_pixels: int) -> ImageRecord:
        """This record with its image, conditioning image and mask held to `max_pixels` wherever decoded."""
        condition, mask = self.conditioning, self.mask
        return replace(
            self,
            load=replace(self.load, max_pixels=max_pixels),
            conditioning=replace(condition, max_pixels=max_pixels) if condition else None,
            mask=replace(mask, max_pixels=max_pixels) if mask else None,
        )


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str


@dataclass(frozen=True)
class Fixed:
    """Something about an input that was repaired rather than skipped (e.g. CMYK converted)."""

    key: str
    what: str


@dataclass
class ScanResult:
    records: Sequence[ImageRecord]
    skipped: list[Skipped] = field(default_factory=list)
    fixed: list[Fixed] = field(default_factory=list)
    uncaptioned_keys: list[str] = field(default_factory=list)  # records without a caption of their own
    notes: list[str] = field(default_factory=list)

    @property
    def uncaptioned(self) -> int:
        return len(self.uncaptioned_keys)

    def log(self, where: str) -> None:
        """Report skips, fixes and notes as log lines, so nothing is dropped silently."""
        for note in self.notes:
            log.warning(note)
        for skip in self.skipped[:MAX_LOGGED]:
            log.warning("skipped %s: %s", skip.key, skip.reason)
        if len(self.skipped) > MAX_LOGGED:
            log.warning(
                "... and %d more skipped (all listed by finetune-data)", len(self.skipped) - MAX_LOGGED
            )
        for fix in self.fixed[:MAX_LOGGED]:
            log.info("fixed %s: %s", fix.key, fix.what)
        if len(self.fixed) > MAX_LOGGED:
            log.info("... and %d more fixed", len(self.fixed) - MAX_LOGGED)
        log.info("found %d images in %s (%d skipped)", len(self.records), where, len(self.skipped))

    def extend(self, other: ScanResult) -> None:
        """Add another source's findings to this one (records must be a list)."""
        assert isinstance(self.records, list)
        self.records.extend(other.records)
        self.skipped += other.skipped
        self.fixed += other.fixed
        self.uncaptioned_keys += other.uncaptioned_keys
        self.notes += other.notes
