"""Captioned-image data: find records (sources), screen and decode them safely, batch them by bucket."""

from finetune.data.datamodule import CaptionedImageDataModule
from finetune.data.dataset import CaptionedImageDataset
from finetune.data.images import IMAGE_EXTENSIONS, ImageDecodeError, open_image, to_rgb
from finetune.data.records import Fixed, ImageRecord, ScanResult, Skipped
from finetune.data.sources import find_records

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionedImageDataModule",
    "CaptionedImageDataset",
    "Fixed",
    "ImageDecodeError",
    "ImageRecord",
    "ScanResult",
    "Skipped",
    "find_records",
    "open_image",
    "to_rgb",
]
