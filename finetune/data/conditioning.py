"""Conditioning images for ControlNet: computed from the target image by a named preprocessor, or read.

A preprocessor is a function (image, data config) -> image, registered in PREPROCESSORS by name, so
depth, pose and others can be added beside canny without touching the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from finetune.config.errors import ConfigError, DataError
from finetune.data.buckets import Fitted, fit_to
from finetune.data.images import ImageDecodeError

Preprocessor = Callable[[Image.Image, Any], Image.Image]


def canny(image: Image.Image, options: Any) -> Image.Image:
    """White edges on black (OpenCV's Canny on the grey image), as canny ControlNets are trained."""
    import cv2  # imported here: only ControlNet runs need OpenCV

    edges = cv2.Canny(np.asarray(image.convert("L")), int(options.canny_low), int(options.canny_high))
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


PREPROCESSORS: dict[str, Preprocessor] = {"canny": canny}


def preprocessor(name: str) -> Preprocessor:
    if name not in PREPROCESSORS:
        raise ConfigError(
            f"data.conditioning: unknown preprocessor '{name}' — choose one of {', '.join(PREPROCESSORS)}"
        )
    return PREPROCESSORS[name]


_TO_UNIT_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


@dataclass(frozen=True)
class ConditioningImages:
    """How a sample's conditioning image is made, aligned with its fitted target image.

    A preprocessor runs on the fitted target (so edges are crisp at training size). A read
    conditioning image is scaled to the target's size, then given exactly the target's crop and flip.
    The result is [3, H, W] in [0, 1], as diffusers' ControlNet pipelines feed it.
    """

    preprocessor: str | None = None
    canny_low: int = 100
    canny_high: int = 200
    dropout: float = 0.0  # share of samples given a blank (all-zero) conditioning image

    @classmethod
    def from_config(cls, cfg: Any) -> ConditioningImages | None:
        if not cfg.conditioning and not cfg.conditioning_path and not cfg.conditioning_column:
            return None
        if cfg.conditioning:
            preprocessor(cfg.conditioning)  # fails now, with the choices, if unknown
        return cls(cfg.conditioning, cfg.canny_low, cfg.canny_high, cfg.conditioning_dropout)

    @property
    def computed(self) -> bool:
        """Made from the target image by a preprocessor (True), or read from its own file (False)."""
        return bool(self.preprocessor)

    def make(self, record: Any, fitted: Fitted, generator: torch.Generator | None = None) -> torch.Tensor:
        """The conditioning tensor for `record`, placed exactly like its `fitted` target image."""
        if not self.computed:
            placed = fitted.original_size, fitted.crop_top_left, fitted.flipped
            return self.read(record, fitted.image.size, *placed, generator)
        if self._dropped(generator):
            return torch.zeros(3, fitted.image.height, fitted.image.width)
        return _TO_UNIT_TENSOR(preprocessor(str(self.preprocessor))(fitted.image, self))

    def read(
        self,
        record: Any,
        size: tuple[int, int],
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int],
        flip: bool,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`record`'s own conditioning image at target `size` (width, height), scaled to its target's
        `original_size` (height, width), then given the target's crop and flip.

        Needs only where the target was placed, not its pixels: cached latents need no image decoded.
        """
        if self._dropped(generator):
            return torch.zeros(3, size[1], size[0])
        condition = decode_conditioning(record)
        original_height, original_width = original_size
        if condition.size != (original_width, original_height):
            condition = condition.resize((original_width, original_height), Image.BICUBIC)
        return _TO_UNIT_TENSOR(fit_to(condition, size, crop_top_left, flip).image)

    def _dropped(self, generator: torch.Generator | None) -> bool:
        return self.dropout > 0 and float(torch.rand((), generator=generator)) < self.dropout


def decode_conditioning(record: Any) -> Image.Image:
    """`record`'s conditioning image, decoded; a failure says it was the conditioning image that failed."""
    if record.conditioning is None:
        raise DataError(f"{record.key} has no conditioning image")
    try:
        return record.conditioning()
    except ImageDecodeError as error:
        raise ImageDecodeError(f"conditioning image: {error}") from error
