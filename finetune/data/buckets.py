"""Aspect-ratio buckets: sizes of about equal area around the training resolution; fitting images to them.

A wide image trained at a square crop loses its sides; squashed, it teaches wrong proportions. With
`data.buckets=true` every image goes to the bucket nearest its aspect ratio, is resized until it covers
it and cropped to it; the crop offset and the original size are kept (SDXL conditions on them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from finetune.config.errors import ConfigError


@lru_cache(maxsize=16)
def bucket_sizes(
    resolution: int, step: int, min_side: int, max_side: int, max_ratio: float
) -> tuple[tuple[int, int], ...]:
    """(width, height) pairs, multiples of `step`, area at most resolution², sorted by aspect ratio."""
    area = resolution * resolution
    sizes = set()
    for width in range(step * math.ceil(min_side / step), max_side + 1, step):
        height = (area // width) // step * step
        if min_side <= height <= max_side and max(width, height) / min(width, height) <= max_ratio:
            sizes.add((width, height))
    if not sizes:
        raise ConfigError(
            f"data.bucket_step: no bucket fits — resolution {resolution}, step {step}, sides "
            f"{min_side}..{max_side}, ratio <= {max_ratio}; use a step that divides the resolution"
        )
    return tuple(sorted(sizes, key=lambda size: size[0] / size[1]))


def buckets_for(cfg: Any) -> tuple[tuple[int, int], ...]:
    """The buckets `cfg` (a DataConfig) asks for."""
    resolution = cfg.resolution
    return bucket_sizes(
        resolution,
        cfg.bucket_step,
        cfg.bucket_min_side or resolution // 2,
        cfg.bucket_max_side or resolution * 2,
        float(cfg.bucket_max_ratio),
    )


def nearest_bucket(buckets: tuple[tuple[int, int], ...], width: int, height: int) -> tuple[int, int]:
    """The bucket nearest the image's aspect ratio, on a log scale (2:1 and 1:2 are as far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda size: (abs(math.log(size[0] / size[1]) - ratio), -size[0] * size[1]))


def target_size(cfg: Any, width: int, height: int) -> tuple[int, int]:
    """The (width, height) an image of this size is trained at: its bucket, or the square resolution."""
    if getattr(cfg, "buckets", False):
        return nearest_bucket(buckets_for(cfg), width, height)
    return cfg.resolution, cfg.resolution


@dataclass(frozen=True)
class Fitted:
    """An image fitted to its target size, and the facts SDXL-style conditioning needs."""

    image: Image.Image
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    flipped: bool


def resized_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the image scaled, proportions kept, until it just covers `size`."""
    scale = max(size[0] / width, size[1] / height)
    return max(size[0], round(width * scale)), max(size[1], round(height * scale))


def choose_crop(
    width: int,
    height: int,
    size: tuple[int, int],
    random_crop: bool,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(top, left) of the `size` crop taken from the resized image: centred, or drawn."""
    resized_w, resized_h = resized_size(width, height, size)
    if not random_crop:
        return (resized_h - size[1]) // 2, (resized_w - size[0]) // 2
    top = int(torch.randint(0, resized_h - size[1] + 1, (), generator=generator))
    left = int(torch.randint(0, resized_w - size[0] + 1, (), generator=generator))
    return top, left


def fit_to(image: Image.Image, size: tuple[int, int], top_left: tuple[int, int], flip: bool) -> Fitted:
    """Resize `image` to cover `size` (width, height) keeping its proportions, crop there, maybe flip."""
    resized_w, resized_h = resized_size(image.width, image.height, size)
    resized = F.resize(image, [resized_h, resized_w], antialias=True)
    cropped = F.crop(resized, top_left[0], top_left[1], size[1], size[0])
    if flip:
        cropped = F.horizontal_flip(cropped)
    return Fitted(cropped, (image.height, image.width), top_left, flip)
