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

from finetune.data.buckets import Fitted, fit_to
from finetune.errors import ConfigError, DataError

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

    def make(self, record: Any, fitted: Fitted, generator: torch.Generator | None = None) -> torch.Tensor:
        """The conditioning tensor for `record`, placed exactly like its `fitted` target image."""
        width, height = fitted.image.size
        if self.dropout > 0 and float(torch.rand((), generator=generator)) < self.dropout:
            return torch.zeros(3, height, width)
        if self.preprocessor:
            return _TO_UNIT_TENSOR(preprocessor(self.preprocessor)(fitted.image, self))
        if record.conditioning is None:
            raise DataError(f"{record.key} has no conditioning image")
        condition = record.conditioning()
        original_height, original_width = fitted.original_size
        if condition.size != (original_width, original_height):
            condition = condition.resize((original_width, original_height), Image.BICUBIC)
        return _TO_UNIT_TENSOR(fit_to(condition, (width, height), fitted.crop_top_left, fitted.flipped).image)
