"""Safe image decoding: one upright RGB `PIL.Image` out of whatever file or dataset value we are given.

One pixel limit, `data.max_pixels`, guards every open: the loaders carry it (so DataLoader workers,
spawned or forked, honour it too) and PIL's own decompression-bomb limit is set to it while we open.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from finetune.config.errors import DataError
from finetune.config.schema import DataConfig

# Extensions looked for when scanning a folder (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_MAX_PIXELS: int = DataConfig.max_pixels  # data.max_pixels' default

# What PIL raises for unreadable, truncated or hostile files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# (first bytes, last bytes, size) of an encoded image: enough to see its format and whether it ends.
Ends = tuple[bytes, bytes, int]
_HEAD_BYTES = 16


class ImageDecodeError(DataError):
    """One image could not be decoded; the dataset turns this into a skip, not a crash."""


class _PilLimit:
    """PIL's decompression-bomb limit set to ours while any of our opens runs, then put back.

    PIL reads one module global (`Image.MAX_IMAGE_PIXELS`) in `Image.open` and in plugins that
    allocate while opening (WebP), so no per-call limit exists; screening opens from several threads
    at once, so the global holds the largest limit in use until the last open ends (other code that
    opens images meanwhile sees it too). PIL then refuses only above twice that, before allocating;
    our own exact check, with each caller's limit, follows every open (`_opened`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: Counter[int] = Counter()
        self._saved: int | None = None

    @contextmanager
    def __call__(self, max_pixels: int) -> Iterator[None]:
        with self._lock:
            if not self._active:
                self._saved = Image.MAX_IMAGE_PIXELS
            self._active[max_pixels] += 1
            Image.MAX_IMAGE_PIXELS = max(self._active)
        try:
            yield
        finally:
            with self._lock:
                self._active[max_pixels] -= 1
                if not self._active[max_pixels]:
                    del self._active[max_pixels]
                Image.MAX_IMAGE_PIXELS = max(self._active) if self._active else self._saved


_pil_limit = _PilLimit()


def over_pixel_limit(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image of this size is refused (data.max_pixels), or None."""
    if width * height <= max_pixels:
        return None
    return _refused(f"{width} x {height} = {width * height:,} pixels", max_pixels)


def _refused(size: str, max_pixels: int) -> str:
    return (
        f"{size} is over data.max_pixels={max_pixels:,} "
        "(refused as a possible decompression bomb; raise data.max_pixels if you trust it)"
    )


def _opened(source: Path | IO[bytes], max_pixels: int) -> Image.Image:
    """`Image.open` under our limit: other PIL errors propagate, the limit's is an ImageDecodeError."""
    try:
        with _pil_limit(max_pixels):
            image = Image.open(source)
    except Image.DecompressionBombError as error:  # over twice the limit: PIL refused before reading
        pixels = re.search(r"\((\d+) pixels\)", str(error))  # PIL names the size, not the sides
        size = f"{int(pixels[1]):,} pixels" if pixels else "the image"
        raise ImageDecodeError(_refused(size, max_pixels)) from error
    if problem := over_pixel_limit(*image.size, max_pixels):
        image.close()
        raise ImageDecodeError(problem)
    return image


# Modes whose transparency is a key in PIL's `info` (a palette entry, or a PNG tRNS colour), and the
# mode with an alpha channel that PIL's convert("RGBA") makes of them.
KEYED_TRANSPARENCY = {"P": "PA", "L": "LA", "RGB": "RGBA"}


def has_alpha(mode: str, info: dict) -> bool:
    """Whether an image of this mode (and PIL `info`) carries transparency."""
    keyed = mode in KEYED_TRANSPARENCY and "transparency" in info
    return keyed or mode in ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert to RGB, compositing any transparency on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # PIL's own convert() clips high-bit-depth greyscale to 0..255, which turns 16-bit scans white.
        array = np.asarray(image, dtype=np.float32)
        if array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if has_alpha(image.mode, image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# What a decode returns, from the opened image: `to_rgb` by default (masks.split_alpha adds its alpha).
Convert = Callable[[Image.Image], Any]


def _decode(source: Path | IO[bytes], where: str, max_pixels: int, convert: Convert = to_rgb) -> Any:
    try:
        with _opened(source, max_pixels) as image:
            image.load()  # the whole file, so truncation shows here
            return convert(image)
    except ImageDecodeError as error:
        raise ImageDecodeError(f"cannot decode image {where}: {error}") from None
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(f"cannot decode image {where}: {_one_line(error)}") from error


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the image file at `path` fully and return it upright in RGB."""
    return _decode(Path(path), f"'{path}'", max_pixels)


def open_header(source: Path | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open the image lazily: size, mode and EXIF are read, pixels are not (cheap, for screening)."""
    try:
        return _opened(source, max_pixels)
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(f"not a readable image: {_one_line(error)}") from error


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's bytes: the cache key part that notices any edit to the image."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_ends(path: str | Path, tail: int) -> Ends:
    """The first bytes, the last `tail` bytes and the size of a file: two short reads."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - tail))
            return head, handle.read(), size
    except OSError as error:
        raise ImageDecodeError(f"not a readable file: {_one_line(error)}") from error


def _encoded(value: Any) -> Path | bytes | bytearray | Image.Image:
    """A dataset cell as the image file it names, its encoded bytes, or the image `datasets` decoded."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return Path(value["path"])
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, Image.Image)):
        return value
    raise ImageDecodeError(f"holds {type(value).__name__}, not an image")


def decode_value(
    value: Any, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, convert: Convert = to_rgb
) -> Any:
    """Turn a dataset cell (PIL image, encoded bytes or {"bytes", "path"} dict) into an RGB image."""
    try:
        value = _encoded(value)
    except ImageDecodeError as error:
        raise ImageDecodeError(f"cannot decode image {where}: {error}") from None
    if isinstance(value, Image.Image):  # decoded by `datasets` already: still held to our limit
        if problem := over_pixel_limit(*value.size, max_pixels):
            raise ImageDecodeError(f"cannot decode image {where}: {problem}")
        return convert(value)
    return _decode(value if isinstance(value, Path) else io.BytesIO(value), where, max_pixels, convert)


def value_header(value: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`open_header` for a dataset cell."""
    value = _encoded(value)
    if isinstance(value, Image.Image):
        if problem := over_pixel_limit(*value.size, max_pixels):
            raise ImageDecodeError(problem)
        return value
    return open_header(value if isinstance(value, Path) else io.BytesIO(value), max_pixels)


def value_ends(value: Any, tail: int) -> Ends | None:
    """`file_ends` for a dataset cell; None for an image `datasets` decoded already."""
    value = _encoded(value)
    if isinstance(value, Path):
        return file_ends(value, tail)
    if isinstance(value, Image.Image):
        return None
    return bytes(value[:_HEAD_BYTES]), bytes(value[-tail:]), len(value)


def value_fingerprint(value: Any) -> str:
    """sha256 of a dataset cell's encoded bytes (or of the pixels, for an already decoded image)."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return file_fingerprint(value["path"])
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, Image.Image):
        value = value.mode.encode() + str(value.size).encode() + value.tobytes()
    return hashlib.sha256(value or b"").hexdigest()


@dataclass(frozen=True)
class FileImage:
    """A picklable loader for an image file (workers receive records by pickling, limit included)."""

    path: Path
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self, convert: Convert = to_rgb) -> Any:
        return _decode(Path(self.path), f"'{self.path}'", self.max_pixels, convert)

    def header(self) -> Image.Image:
        return open_header(Path(self.path), self.max_pixels)

    def ends(self, tail: int) -> Ends | None:
        return file_ends(self.path, tail)

    def fingerprint(self) -> str:
        return file_fingerprint(self.path)


@dataclass(frozen=True, eq=False)
class DatasetImage:
    """A picklable loader for the image in one row of a `datasets.Dataset`."""

    dataset: Any
    column: str
    index: int
    key: str
    max_pixels: int = DEFAULT_MAX_PIXELS

    def _value(self) -> Any:
        try:
            return self.dataset[self.index][self.column]
        except Exception as error:  # datasets decodes on access: any failure is this row's problem
            raise ImageDecodeError(f"cannot decode image {self.key}: {_one_line(error)}") from error

    def __call__(self, convert: Convert = to_rgb) -> Any:
        return decode_value(self._value(), self.key, self.max_pixels, convert)

    def header(self) -> Image.Image:
        return value_header(self._value(), self.max_pixels)

    def ends(self, tail: int) -> Ends | None:
        return value_ends(self._value(), tail)

    def fingerprint(self) -> str:
        return value_fingerprint(self._value())


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
