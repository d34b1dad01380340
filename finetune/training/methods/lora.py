"""The LoRA family (`method.algo`) on the U-Net, and optionally the text encoders, through peft."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from finetune.config.errors import ConfigError
from finetune.config.methods import LoraAlgo, LoraMethodConfig
from finetune.export.lora_apply import attach_from_file, pipeline_models
from finetune.export.lora_file import LoraFile, layers_for, read_lora_file
from finetune.models.loading import Components
from finetune.training.methods.adapters import adapter_config, attach, conv_rank
from finetune.training.methods.base import unet_denoise


class LoraMethod:
    """`method=lora`: an adapter of the LoRA family on the U-Net, optionally on the text encoders too."""

    name = "lora"
    denoise = staticmethod(unet_denoise)

    def __init__(self, cfg: LoraMethodConfig) -> None:
        self.cfg = cfg
        self._init_file: LoraFile | None = None

    def init_file(self) -> LoraFile | None:
        """`method.init_from`, read once."""
        if self._init_file is None and self.cfg.init_from is not None:
            self._init_file = read_init_from(self.cfg)
        return self._init_file

    def prepare(self, components: Components) -> Components:
        cfg = self.cfg
        from_file = self.init_file()
        taken = 0
        for prefix, model in self._adapted(components):
            if from_file is not None and (layers := layers_for(from_file, model, prefix)):
                attach_from_file(model, from_file, layers)
                taken += len(layers)
            elif prefix == "lora_unet":
                attach(model, adapter_config(cfg, cfg.target_modules, convs=True))
            else:
                text_layers = _used_layers(model, components)
                attach(
                    model,
                    adapter_config(cfg, cfg.text_encoder_target_modules, convs=False, layers=text_layers),
                )
            if prefix != "lora_unet" and components.unet.is_gradient_checkpointing:
                model.gradient_checkpointing_enable()
        if from_file is not None and not any(name.startswith("lora_unet_") for name in from_file.layers):
            raise ConfigError(f"method.init_from: {cfg.init_from} holds no U-Net layers")
        if from_file is not None and taken < len(from_file.layers):
            raise ConfigError(
                f"method.init_from: {len(from_file.layers) - taken} layers of {cfg.init_from} fit no model "
                "here (SD 1.x/2.x files name one text encoder lora_te_, SDXL files lora_te1_ and lora_te2_)"
            )
        return components  # the adapters live inside its models

    def _adapted(self, components: Components) -> list[tuple[str, torch.nn.Module]]:
        """(kohya prefix, model) of each model that gets an adapter: the U-Net, and with
        `train_text_encoder` the text encoder(s) (SDXL: both)."""
        models = pipeline_models(components)
        return models if self.cfg.train_text_encoder else models[:1]

    def trainable_modules(self, components: Components) -> list[torch.nn.Module]:
        if self.cfg.train_text_encoder:
            return [components.unet, *components.text_encoders]
        return [components.unet]

    def callbacks(self) -> list:
        return []

    def inference_weights(self) -> Any:
        return nullcontext()

    def summary(self) -> dict[str, Any]:
        cfg = self.cfg
        rank, alpha = cfg.rank, cfg.alpha if cfg.alpha is not None else cfg.rank
        from_file = self.init_file()
        if from_file is not None:  # the file's rank and alpha are the adapter's
            rank, alpha = from_file.common_rank(), from_file.common_alpha()
        summary = {"method": "lora", "algo": str(cfg.algo), "rank": rank, "alpha": alpha}
        summary["text_encoder"] = cfg.train_text_encoder
        if from_file is not None:
            summary["init_from"] = Path(cfg.init_from).name
        elif conv_rank(cfg) is not None:
            summary["conv_rank"] = conv_rank(cfg)
            summary["conv_alpha"] = cfg.conv_alpha if cfg.conv_alpha is not None else conv_rank(cfg)
        return summary

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


# `method.init_from`: the `method.algo` each algorithm of a file continues as (LoCon is LoRA with
# convolution layers); LoKr files are not read into adapters yet.
_SAME_FAMILY = {"lora": {LoraAlgo.lora, LoraAlgo.locon}, "dora": {LoraAlgo.dora}, "loha": {LoraAlgo.loha}}


def read_init_from(cfg: LoraMethodConfig) -> LoraFile | None:
    """The file of `method.init_from`, checked against the rest of the method config; None without one.
    The file decides what trains: its layers, their ranks and alphas, and whether it is DoRA."""
    if cfg.init_from is None:
        return None
    lora = read_lora_file(cfg.init_from)
    found = lora.algo()
    if found not in _SAME_FAMILY:
        raise ConfigError(
            f"method.init_from: {cfg.init_from} holds a {found} adapter, which cannot be continued yet"
        )
    if cfg.algo not in _SAME_FAMILY[found]:
        raise ConfigError(
            f"method.init_from: {cfg.init_from} holds a {found} adapter; set method.algo={found}"
        )
    if not cfg.train_text_encoder and any(not name.startswith("lora_unet_") for name in lora.layers):
        raise ConfigError(
            f"method.init_from: {cfg.init_from} trains the text encoder too; "
            "set method.train_text_encoder=true"
        )
    return lora


def _used_layers(text_encoder: torch.nn.Module, components: Components) -> list[int] | None:
    """The layers whose output reaches the U-Net; None for all. SDXL reads its first text encoder's
    penultimate layer, and `model.clip_skip` = n the n-th from the end, so the adapters of the layers
    after it would never train (and DDP refuses unused weights); SDXL's second encoder's last layer
    feeds the pooled text."""
    if text_encoder is not components.text_encoder:
        return None
    skipped = 1 if components.is_sdxl else components.clip_skip - 1
    layers = text_encoder.config.num_hidden_layers
    return list(range(layers - skipped)) if skipped else None
