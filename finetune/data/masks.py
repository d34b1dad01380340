"""Loss masks (`data.masks`): a per-pixel weight for the training loss, white = train, black = ignore.

`data.masks=alpha` reads each image's alpha channel; `data.masks=<folder>` reads a greyscale image of
the same relative name (any image extension) from that folder. A mask is placed exactly like its
image (the same resize, crop box and flip) and reaches the batch as `loss_mask`, [1, H, W] in [0, 1].
The loss weighs each latent element by the mask averaged over that element's pixels (`to_latent_grid`).

Choices, for users coming from kohya's `--masked_loss` / `--alpha_mask` and OneTrainer:
- An image without an alpha channel under `alpha` trains on the whole image (kohya does the same),
  so one folder can mix cut-outs and whole pictures; the data report counts them in a note.
- An image without a mask file under `<folder>` is skipped with its reason: training it unmasked
  would silently teach the very background the user masked out everywhere else.
- A mask of another size than its image is resized to the image's size first (noted as fixed).

How much a mask weighs in the loss (OneTrainer's floor, whole-image samples, normalization by area) is
the loss's business: `loss.unmasked_weight`, `loss.unmasked_probability`, `loss.normalize_masked_area`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.nn import functional as F
from torchvision.transforms import v2

from finetune.config.errors import DataError
from finetune.data.buckets import fit_to
from finetune.data.folder import attach_parallel
from finetune.data.images import ImageDecodeError, has_alpha, to_rgb
from finetune.data.records import ImageRecord, ImageSource, ScanResult

ALPHA = "alpha"  # data.masks: the image's own alpha channel; any other value names a folder
_TO_UNIT_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """`to_rgb(image)` and the upright image's alpha channel (mode L), or None when it has none."""
    upright = ImageOps.exif_transpose(image)
    alpha = upright.convert("RGBA").getchannel("A") if has_alpha(upright.mode, upright.info) else None
    return to_rgb(upright), alpha


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """A [B, 1, H, W] mask as weights on a latent grid of `size` (h, w): the mean of the pixels each
    latent element stands for (area interpolation; the identity when the mask is at that size already)."""
    return F.interpolate(mask, size=tuple(size), mode="area")


@dataclass(frozen=True)
class LossMasks:
    """Where masks come from (the alpha channel, or each record's mask file) and how they are placed."""

    alpha: bool

    @classmethod
    def from_config(cls, cfg: Any) -> LossMasks | None:
        masks = getattr(cfg, "masks", None)
        return None if not masks else cls(alpha=str(masks) == ALPHA)

    def load(self, record: ImageRecord) -> tuple[Image.Image, Image.Image]:
        """`record`'s image (RGB) and its mask (L, the image's size); raises ImageDecodeError."""
        if self.alpha:
            image, alpha = record.load(split_alpha)
            return image, alpha if alpha is not None else Image.new("L", image.size, 255)
        image = record.load()
        if record.mask is None:
            raise DataError(f"{record.key} has no mask image")
        try:
            mask = record.mask().convert("L")  # a colour mask counts by its brightness
        except ImageDecodeError as error:
            raise ImageDecodeError(f"mask image: {error}") from error
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.BILINEAR)  # bilinear: no overshoot past black or white
        return image, mask

    def identity(self, record: ImageRecord, fingerprint: Callable[[ImageSource], str]) -> str:
        """What the cache key must know about `record`'s mask: `fingerprint(source)` hashes a file."""
        if self.alpha:
            return ALPHA  # the image's own bytes, in the key already, hold it
        assert record.mask is not None
        return f"file:{fingerprint(record.mask)}"


def load_with_mask(record: ImageRecord, masks: LossMasks | None) -> tuple[Image.Image, Image.Image | None]:
    """`record`'s image, and its mask when `masks` are on (else None)."""
    return masks.load(record) if masks is not None else (record.load(), None)


def place(mask: Image.Image, size: tuple[int, int], top_left: tuple[int, int], flip: bool) -> torch.Tensor:
    """The mask fitted exactly like its image (`buckets.fit_to`), as a [1, H, W] tensor in [0, 1]."""
    return _TO_UNIT_TENSOR(fit_to(mask, size, top_left, flip).image)


def attach_mask_files(result: ScanResult, folder: Path, max_pixels: int) -> None:
    """Give each record the image of the same relative name (any image extension) under `folder`;
    a record without one is skipped with its reason."""
    attach_parallel(result, folder, "mask", "mask image", " (data.masks)", max_pixels)
