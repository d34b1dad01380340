"""What every method is: the `Method` interface, and the plain U-Net prediction most of them use."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch

from finetune.models.loading import Components
from finetune.models.prompts import TextConditioning


class Method(Protocol):
    """What the trainer needs from a method."""

    name: str

    def prepare(self, components: Components) -> Components:
        """Freeze the base and make what trains: adapters attached to its models, or a new model (the
        ControlNet), returned in the components the method trains (the given ones are not changed)."""

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
