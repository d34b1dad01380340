"""Screen records before training: read each image's header, skip what cannot be used, note what is fixed.

Reading a header costs a file open and a few hundred bytes, so every image is screened at start-up;
`data.verify=true` also decodes every image, so a file truncated after its header is caught here too
rather than being replaced by the next image at training time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageOps

from finetune.data.buckets import target_size
from finetune.data.images import ImageDecodeError
from finetune.data.records import Fixed, ImageRecord, ScanResult, Skipped

# EXIF orientations 5-8 turn the image a quarter: width and height swap once it is upright.
_QUARTER_TURNS = {5, 6, 7, 8}
_MODE_FIXES = {
    "CMYK": "CMYK converted to RGB",
    "YCbCr": "YCbCr converted to RGB",
    "LAB": "Lab converted to RGB",
    "HSV": "HSV converted to RGB",
    "L": "greyscale converted to RGB",
    "1": "1-bit image converted to RGB",
    "P": "palette image converted to RGB",
    "LA": "greyscale with transparency composited on white",
    "RGBA": "transparency composited on white",
    "PA": "palette with transparency composited on white",
    "I": "32-bit integer image scaled to 8-bit",
    "F": "floating-point image scaled to 8-bit",
    "I;16": "16-bit image scaled to 8-bit",
    "I;16B": "16-bit image scaled to 8-bit",
    "I;16L": "16-bit image scaled to 8-bit",
}
_THREADS = 8  # header reads wait on the disk, not the CPU


def screen_records(result: ScanResult, cfg: Any) -> ScanResult:
    """A new ScanResult holding only usable records, each with its upright (width, height)."""
    screened = ScanResult(records=[], skipped=list(result.skipped), fixed=list(result.fixed))
    screened.uncaptioned, screened.notes = result.uncaptioned, list(result.notes)
    verify = bool(getattr(cfg, "verify", False))
    with ThreadPoolExecutor(_THREADS) as pool:
        outcomes = pool.map(lambda record: _screen(record, cfg, verify), result.records)
        for record, outcome in zip(result.records, outcomes, strict=True):
            if isinstance(outcome, Skipped):
                screened.skipped.append(outcome)
                continue
            size, fixes = outcome
            screened.fixed += [Fixed(record.key, what) for what in fixes]
            screened.records.append(record.with_(size=size))
    return screened


def _screen(record: ImageRecord, cfg: Any, verify: bool) -> Skipped | tuple[tuple[int, int], list[str]]:
    """(upright size, what will be fixed) for a usable image, or why it is skipped."""
    try:
        with record.load.header() as image:
            width, height = image.size
            mode, transparent = image.mode, "transparency" in image.info
            orientation = _orientation(image)
    except ImageDecodeError as error:
        return Skipped(record.key, str(error))
    if width < 1 or height < 1:
        return Skipped(record.key, f"image is {width} x {height} pixels")
    if width * height > cfg.max_pixels:
        return Skipped(
            record.key,
            f"{width} x {height} = {width * height:,} pixels is over data.max_pixels={cfg.max_pixels:,} "
            "(refused as a possible decompression bomb; raise data.max_pixels if you trust it)",
        )
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    fixes = []
    if orientation not in (None, 1):
        fixes.append(f"turned upright (EXIF orientation {orientation})")
    if mode == "P" and transparent:
        fixes.append(_MODE_FIXES["PA"])
    elif mode in _MODE_FIXES:
        fixes.append(_MODE_FIXES[mode])
    target_w, target_h = target_size(cfg, width, height)
    if width < target_w or height < target_h:
        if not cfg.upscale_small:
            return Skipped(
                record.key,
                f"{width} x {height} is smaller than its target {target_w} x {target_h} "
                "(data.upscale_small=false)",
            )
        fixes.append(f"upscaled: {width} x {height} is smaller than its target {target_w} x {target_h}")
    if record.conditioning is not None and (why := _misaligned(record, width, height)):
        return Skipped(record.key, why)
    if verify:
        try:
            record.load()
            if record.conditioning is not None:
                record.conditioning()
        except ImageDecodeError as error:
            return Skipped(record.key, str(error))
    return (width, height), fixes


def _misaligned(record: ImageRecord, width: int, height: int) -> str | None:
    """Why a record's conditioning image cannot be paired with it (unreadable, other shape), or None."""
    assert record.conditioning is not None
    try:
        with record.conditioning.header() as image:
            cond_w, cond_h = image.size
            if _orientation(image) in _QUARTER_TURNS:
                cond_w, cond_h = cond_h, cond_w
    except ImageDecodeError as error:
        return f"conditioning image: {error}"
    if abs(cond_w / cond_h - width / height) > 0.01 * (width / height):
        return f"conditioning image is {cond_w} x {cond_h}, another shape than the image ({width} x {height})"
    return None


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(ImageOps.ExifTags.Base.Orientation)
    except Exception:  # a broken EXIF block is not a broken image: exif_transpose ignores it too
        return None
