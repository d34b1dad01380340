"""CLIP score of validation samples against their prompts (torchmetrics), with a local CLIP model."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPModel, CLIPProcessor

log = logging.getLogger(__name__)


class SampleClipScore:
    """`score(images, prompts)`: torchmetrics' CLIP score (0-100, higher = closer to the prompt).

    The model loads on first use, from a folder or the local hub cache; when it cannot, one notice
    is logged and every later call returns None, so a run never stops for a metric.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._metric: CLIPScore | None = None
        self._unavailable = False

    def _load(self) -> CLIPScore | None:
        try:
            parts = (
                _FeatureTensors.from_pretrained(self.model),
                CLIPProcessor.from_pretrained(self.model),
            )
        except (OSError, ValueError) as error:
            log.warning("validation.clip_model: cannot load '%s' (%s); CLIP score skipped", self.model, error)
            self._unavailable = True
            return None
        return CLIPScore(model_name_or_path=lambda: parts)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> float | None:
        """`images`: [N, 3, H, W] in [0, 1], one per prompt."""
        if self._unavailable:
            return None
        if self._metric is None:
            self._metric = self._load()
            if self._metric is None:
                return None
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        self._metric.reset()
        return float(self._metric(list(pixels), prompts))


class _FeatureTensors(CLIPModel):
    """CLIPModel whose feature methods return tensors: transformers 5 returns model outputs (the
    projected features in `pooler_output`), while torchmetrics 1.9 expects tensors."""

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features(super().get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features(super().get_text_features(*args, **kwargs))


def _features(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output
