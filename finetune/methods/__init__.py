"""Training methods: which weights train and how they are exported.

A method is a small object, not a training loop: the one `DiffusionModule` serves every method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch

from finetune.errors import ConfigError
from finetune.models import Components
from finetune.prompts import TextConditioning


class Method(Protocol):
    """What the trainer needs from a method."""

    name: str

    def prepare(self, components: Components) -> None:
        """Freeze the base, attach whatever trains (adapters, a ControlNet …)."""

    def trainable_modules(self, components: Components) -> list[torch.nn.Module]:
        """Modules whose `requires_grad` parameters train."""

    def denoise(
        self,
        components: Components,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        batch: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The model's prediction for the noisy latents (ControlNet adds its residuals here)."""

    def callbacks(self) -> list[L.Callback]:
        """Lightning callbacks the method needs (e.g. an EMA update)."""

    def inference_weights(self) -> Any:
        """A context manager under which the module holds the weights to sample and export with."""

    def summary(self) -> dict[str, Any]:
        """A few facts for logs and export metadata (rank, alpha …)."""

    def export(self, components: Components, run_dir: Path, metadata: dict[str, str]) -> dict[str, Path]:
        """Write files other tools load under `run_dir`; returns name → path."""


def unet_denoise(
    components: Components,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: TextConditioning,
    batch: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The plain U-Net prediction: `denoise` for methods that only change U-Net weights."""
    return components.unet(
        noisy_latents, timesteps, text.hidden, added_cond_kwargs=text.added, return_dict=False
    )[0]


def build_method(cfg: Any) -> Method:
    """The method named by `cfg.name`, built from its config node."""
    from finetune.methods.controlnet import ControlNetMethod
    from finetune.methods.full import FullMethod
    from finetune.methods.lora import LoraMethod

    methods = {"lora": LoraMethod, "full": FullMethod, "controlnet": ControlNetMethod}
    if cfg.name not in methods:
        raise ConfigError(f"method.name: unknown method '{cfg.name}' — choose one of {', '.join(methods)}")
    return methods[cfg.name](cfg)
