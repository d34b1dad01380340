"""LoRA adapters on the U-Net (and optionally the text encoder), through peft."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from finetune.config.schema import LoraMethodConfig
from finetune.models.loading import Components
from finetune.training.methods.base import unet_denoise


def add_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float | None,
    target_modules: list[str],
    dropout: float = 0.0,
    init_weights: str | bool = "gaussian",
    layers: list[int] | None = None,
) -> None:
    """Freeze `model` and attach a trainable float32 LoRA adapter named "default" (on the numbered
    `layers` of a text encoder only, when given)."""
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        init_lora_weights=init_weights,
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
    )
    model.add_adapter(config)
    # peft creates the adapter in the base weights' dtype; train it in float32 (diffusers' advice).
    cast_training_params(model, dtype=torch.float32)


class LoraMethod:
    """`method=lora`: LoRA on the U-Net, optionally on the text encoder too."""

    name = "lora"
    denoise = staticmethod(unet_denoise)

    def __init__(self, cfg: LoraMethodConfig) -> None:
        self.cfg = cfg

    def prepare(self, components: Components) -> Components:
        cfg = self.cfg
        add_lora(components.unet, cfg.rank, cfg.alpha, cfg.target_modules, cfg.dropout, cfg.init_weights)
        if cfg.train_text_encoder:  # SDXL: both text encoders
            for text_encoder in components.text_encoders:
                add_lora(
                    text_encoder,
                    cfg.rank,
                    cfg.alpha,
                    cfg.text_encoder_target_modules,
                    cfg.dropout,
                    cfg.init_weights,
                    layers=_used_layers(text_encoder, components),
                )
                if components.unet.is_gradient_checkpointing:
                    text_encoder.gradient_checkpointing_enable()
        return components  # the adapters live inside its models

    def trainable_modules(self, components: Components) -> list[torch.nn.Module]:
        if self.cfg.train_text_encoder:
            return [components.unet, *components.text_encoders]
        return [components.unet]

    def callbacks(self) -> list:
        return []

    def inference_weights(self) -> Any:
        return nullcontext()

    def summary(self) -> dict[str, Any]:
        alpha = self.cfg.alpha if self.cfg.alpha is not None else self.cfg.rank
        return {
            "method": "lora",
            "rank": self.cfg.rank,
            "alpha": alpha,
            "text_encoder": self.cfg.train_text_encoder,
        }

    def export(self, components: Components, run_dir: Path, metadata: dict[str, str]) -> dict[str, Path]:
        """`<run_dir>/adapter/`: the diffusers and the kohya file."""
        from finetune.export.lora import export_lora

        trained = self.cfg.train_text_encoder
        return export_lora(
            run_dir / "adapter",
            components.unet,
            components.text_encoder if trained else None,
            text_encoder_2=components.text_encoder_2 if trained else None,
            metadata=metadata,
        )


def _used_layers(text_encoder: torch.nn.Module, components: Components) -> list[int] | None:
    """The layers whose output reaches the U-Net; None for all. SDXL reads its first text encoder's
    penultimate layer, so the last layer's adapter would never train (and DDP refuses unused weights);
    the second encoder's last layer feeds the pooled text."""
    if not components.is_sdxl or text_encoder is not components.text_encoder:
        return None
    return list(range(text_encoder.config.num_hidden_layers - 1))
