"""Safe image decoding: one upright RGB `PIL.Image` out of whatever file or dataset value we are given."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from finetune.errors import DataError

# Extensions looked for when scanning a folder (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# What PIL raises for unreadable, truncated or hostile files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDecodeError(DataError):
    """One image could not be decoded; the dataset turns this into a skip, not a crash."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert to RGB, compositing any transparency on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # PIL's own convert() clips high-bit-depth greyscale to 0..255, which turns 16-bit scans white.
        array = np.asarray(image, dtype=np.float32)
        if array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Decode the image file at `path` fully (so truncation shows here) and return it upright in RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(f"cannot decode image '{path}': {_one_line(error)}") from error


def open_header(path: str | Path) -> Image.Image:
    """Open the image file lazily: size, mode and EXIF are read, pixels are not (cheap, for screening)."""
    try:
        return Image.open(path)
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(f"not a readable image: {_one_line(error)}") from error


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's bytes: the cache key part that notices any edit to the image."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decode_value(value: Any, where: str) -> Image.Image:
    """Turn a dataset cell (PIL image, encoded bytes or {"bytes", "path"} dict) into an RGB image."""
    try:
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            return open_image(value["path"])
        if isinstance(value, dict):
            value = value.get("bytes")
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as image:
                image.load()
                return to_rgb(image)
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(f"cannot decode image {where}: {_one_line(error)}") from error
    raise ImageDecodeError(f"cannot decode image {where}: holds {type(value).__name__}, not an image")


def value_header(value: Any) -> Image.Image:
    """`open_header` for a dataset cell."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return open_header(value["path"])
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return open_header(io.BytesIO(value))
    raise ImageDecodeError(f"holds {type(value).__name__}, not an image")


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
    """A picklable loader for an image file (workers receive records by pickling)."""

    path: Path

    def __call__(self) -> Image.Image:
        return open_image(self.path)

    def header(self) -> Image.Image:
        return open_header(self.path)

    def fingerprint(self) -> str:
        return file_fingerprint(self.path)


@dataclass(frozen=True, eq=False)
class DatasetImage:
    """A picklable loader for the image in one row of a `datasets.Dataset`."""

    dataset: Any
    column: str
    index: int
    key: str

    def _value(self) -> Any:
        try:
            return self.dataset[self.index][self.column]
        except Exception as error:  # datasets decodes on access: any failure is this row's problem
            raise ImageDecodeError(f"cannot decode image {self.key}: {_one_line(error)}") from error

    def __call__(self) -> Image.Image:
        return decode_value(self._value(), self.key)

    def header(self) -> Image.Image:
        return value_header(self._value())

    def fingerprint(self) -> str:
        return value_fingerprint(self._value())


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
