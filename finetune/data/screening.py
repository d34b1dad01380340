"""Screen records before training: read each image's header, skip what cannot be used, note what is fixed.

Reading a header costs a file open and a few hundred bytes, so every image is screened at start-up.
Its last bytes are read too: a PNG ends with its IEND chunk, a JPEG with its end marker (FF D9), a
WebP is as long as its RIFF header says. Zero and 0xFF padding after the end is allowed; a file
whose end is still missing is decoded once, and skipped if that fails, so a file cut short is named
in the report rather than replaced by the next image at training time, while a file with extra bytes
after its end (phones append motion-photo videos to JPEGs) still trains. `data.verify=true` decodes
every image (catching damage in the middle of a file too).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageOps

from finetune.data.buckets import target_size
from finetune.data.images import KEYED_TRANSPARENCY, ImageDecodeError, has_alpha
from finetune.data.masks import ALPHA
from finetune.data.records import Fixed, ImageRecord, ImageSource, ScanResult, Skipped
from finetune.data.source_settings import source_views

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
_TAIL_BYTES = 4096  # read from the end of each file: one disk block, room for padding after the end
_PADDING = b"\x00\xff"  # bytes some writers add after an image's end (block padding, JPEG fill bytes)
_PNG = (b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82")  # signature; the IEND chunk
_JPEG = (b"\xff\xd8\xff", b"\xff\xd9")  # start of image; end of image


def screen_records(result: ScanResult, cfg: Any) -> ScanResult:
    """A new ScanResult holding only usable records, each with its upright (width, height)."""
    screened = ScanResult(records=[], skipped=list(result.skipped), fixed=list(result.fixed))
    screened.uncaptioned_keys, screened.notes = list(result.uncaptioned_keys), list(result.notes)
    verify = bool(getattr(cfg, "verify", False))
    without_alpha = []  # data.masks=alpha: images that train whole, having no alpha channel
    with ThreadPoolExecutor(_THREADS) as pool:
        views = source_views(cfg)  # each record screened against its own source's target size
        outcomes = pool.map(lambda record: _screen(record, views[record.source], verify), result.records)
        for record, outcome in zip(result.records, outcomes, strict=True):
            if isinstance(outcome, Skipped):
                screened.skipped.append(outcome)
                continue
            size, fixes, alpha = outcome
            screened.fixed += [Fixed(record.key, what) for what in fixes]
            screened.records.append(record.with_(size=size))
            if not alpha:
                without_alpha.append(record.key)
    if str(getattr(cfg, "masks", None)) == ALPHA and without_alpha:
        examples = ", ".join(without_alpha[:3]) + (", ..." if len(without_alpha) > 3 else "")
        screened.notes.append(
            f"data.masks=alpha: {len(without_alpha)} of {len(screened.records)} images have no alpha "
            f"channel and train on the whole image ({examples})"
        )
    return screened


def _screen(record: ImageRecord, cfg: Any, verify: bool) -> Skipped | tuple[tuple[int, int], list[str], bool]:
    """(upright size, what will be fixed, whether it has an alpha channel) for a usable image, or why
    it is skipped."""
    if why := cut_short(record.load):  # first: a cut WebP already fails to open, less clearly
        return Skipped(record.key, why)
    try:  # the loader refuses images over data.max_pixels here, as it does when decoding
        with record.load.header() as image:
            width, height = image.size
            mode, transparent = image.mode, "transparency" in image.info
            alpha = has_alpha(image.mode, image.info)
            orientation = _orientation(image)
    except ImageDecodeError as error:
        return Skipped(record.key, str(error))
    if width < 1 or height < 1:
        return Skipped(record.key, f"image is {width} x {height} pixels")
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    fixes = []
    if orientation not in (None, 1):
        fixes.append(f"turned upright (EXIF orientation {orientation})")
    if transparent and mode in KEYED_TRANSPARENCY:  # a transparent palette entry or PNG colour key
        fixes.append(_MODE_FIXES[KEYED_TRANSPARENCY[mode]])
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
    if record.mask is not None:
        mask_size = _mask_size(record)
        if isinstance(mask_size, str):
            return Skipped(record.key, mask_size)
        if mask_size != (width, height):
            mask_w, mask_h = mask_size
            fixes.append(f"mask is {mask_w} x {mask_h}: resized to the image's {width} x {height}")
    if verify:
        try:
            record.load()
            for other in (record.conditioning, record.mask):  # their errors name their own files
                if other is not None:
                    other()
        except ImageDecodeError as error:
            return Skipped(record.key, str(error))
    return (width, height), fixes, alpha


def _mask_size(record: ImageRecord) -> tuple[int, int] | str:
    """The upright (width, height) of a record's mask file, or why it cannot be read."""
    assert record.mask is not None
    return _upright_size(record.mask, "mask image")


def _upright_size(source: Any, what: str) -> tuple[int, int] | str:
    """The upright (width, height) of a paired image file, or why it cannot be read (naming `what`)."""
    if why := cut_short(source):
        return f"{what}: {why}"
    try:
        with source.header() as image:
            width, height = image.size
            if _orientation(image) in _QUARTER_TURNS:
                width, height = height, width
    except ImageDecodeError as error:
        return f"{what}: {error}"
    return width, height


def _misaligned(record: ImageRecord, width: int, height: int) -> str | None:
    """Why a record's conditioning image cannot be paired with it (unreadable, other shape), or None."""
    assert record.conditioning is not None
    size = _upright_size(record.conditioning, "conditioning image")
    if isinstance(size, str):
        return size
    cond_w, cond_h = size
    if abs(cond_w / cond_h - width / height) > 0.01 * (width / height):
        return f"conditioning image is {cond_w} x {cond_h}, another shape than the image ({width} x {height})"
    return None


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(ImageOps.ExifTags.Base.Orientation)
    except Exception:  # a broken EXIF block is not a broken image: exif_transpose ignores it too
        return None


def cut_short(source: ImageSource) -> str | None:
    """Why an encoded image was cut short (its end is missing and it does not decode), or None."""
    try:
        ends = source.ends(_TAIL_BYTES)
    except ImageDecodeError:
        return None  # unreadable: the header read says so
    missing = missing_end(*ends) if ends else None
    if missing is None:
        return None
    try:
        source()  # extra bytes after the real end still decode; a cut file does not
    except ImageDecodeError as error:
        return f"file is cut short: {missing} ({error})"
    return None


def missing_end(head: bytes, tail: bytes, size: int) -> str | None:
    """What end a PNG, JPEG or WebP lacks, judged by its first and last bytes; None: complete, or other."""
    if head.startswith(_PNG[0]) and not tail.rstrip(_PADDING).endswith(_PNG[1]):
        return "no PNG end chunk (IEND)"
    if head.startswith(_JPEG[0]) and not tail.rstrip(_PADDING).endswith(_JPEG[1]):
        return "no JPEG end marker (FF D9)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8  # the RIFF size counts what follows it
        if size < declared:
            return f"its RIFF header gives {declared:,} bytes, the file has {size:,}"
    return None
