"""Captioned-image data: find records (sources), decode safely (images), batch them (datamodule)."""

from finetune.data.datamodule import CaptionedImageDataModule, CaptionedImageDataset, build_transform
from finetune.data.images import IMAGE_EXTENSIONS, ImageDecodeError, open_image, to_rgb
from finetune.data.sources import ImageRecord, ScanResult, Skipped, find_records

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionedImageDataModule",
    "CaptionedImageDataset",
    "ImageDecodeError",
    "ImageRecord",
    "ScanResult",
    "Skipped",
    "build_transform",
    "find_records",
    "open_image",
    "to_rgb",
]
