"""Put a LoRA-family file's layers onto a model: as peft adapters holding its tensors (training's
`method.init_from`), or fused into the model's weights (`finetune-lora merge`, `finetune-generate`)."""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoraConfig, PeftConfig

from finetune.config.errors import ConfigError
from finetune.export.kohya_layout import ADAPTER_NAME
from finetune.export.lora_file import LoraFile, layers_for
from finetune.export.lora_math import layer_delta


def pipeline_models(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """(kohya prefix, model) of a pipeline's U-Net and text encoders."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [("lora_unet", pipe.unet), ("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)]
    return [("lora_unet", pipe.unet), ("lora_te", pipe.text_encoder)]


def fuse_file(models: list[tuple[str, torch.nn.Module]], lora: LoraFile, weight: float, key: str) -> int:
    """Add `weight` times the file's changes to the weights of (kohya prefix, model) pairs; returns how
    many layers changed. DoRA goes through peft's own merge: its change depends on the base weight."""
    changed = 0
    for prefix, model in models:
        layers = layers_for(lora, model, prefix, key=key)
        if not layers:
            continue
        if lora.algo() == "dora":
            _fuse_with_peft(model, lora, layers, weight)
        else:
            with torch.no_grad():
                for name, path in layers.items():
                    parameter = model.get_submodule(path).weight
                    delta = layer_delta(lora.layers[name]).reshape(parameter.shape)
                    parameter.add_(delta.to(parameter.dtype), alpha=weight)
        changed += len(layers)
    if changed < len(lora.layers):
        raise ConfigError(
            f"{key}: {len(lora.layers) - changed} layers of the file fit no model here (SD 1.x/2.x files "
            "name one text encoder lora_te_, SDXL files two, lora_te1_ and lora_te2_)"
        )
    return changed


def _fuse_with_peft(model: torch.nn.Module, lora: LoraFile, layers: dict[str, str], weight: float) -> None:
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    attach_from_file(model, lora, layers)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "merge") and hasattr(layer, "scale_layer"):
                layer.scale_layer(weight)
                layer.merge()
    recurse_remove_peft_layers(model)  # the merged base layers take the adapters' places
    del model.peft_config
    model._hf_peft_config_loaded = False


def attach_from_file(model: Any, lora: LoraFile, layers: dict[str, str]) -> None:
    """Trainable float32 adapters named "default" on exactly the file's `layers` of `model`
    ({kohya layer name: module path}, `lora_file.layers_for`), holding the file's tensors."""
    model.requires_grad_(False)
    model.add_adapter(_config(lora, layers))
    cast_training_params(model, dtype=torch.float32)
    with torch.no_grad():
        for name, path in layers.items():
            _copy_into(model.get_submodule(path), lora.layers[name])


def _config(lora: LoraFile, layers: dict[str, str]) -> PeftConfig:
    rank = lora.common_rank()
    # Full module paths, escaped: peft matches pattern keys as regular expressions.
    common = dict(
        r=rank,
        target_modules=list(layers.values()),
        rank_pattern={re.escape(path): lora.rank(name) for name, path in layers.items()},
        alpha_pattern={re.escape(path): lora.alpha(name) for name, path in layers.items()},
    )
    if lora.algo() == "loha":
        return LoHaConfig(alpha=lora.common_alpha(), **common)
    return LoraConfig(lora_alpha=lora.common_alpha(), use_dora=lora.algo() == "dora", **common)


def _copy_into(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if "hada_w1_a" in tensors:
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            getattr(layer, name)[ADAPTER_NAME].copy_(tensors[name])
        return
    layer.lora_A[ADAPTER_NAME].weight.copy_(tensors["lora_down.weight"])
    layer.lora_B[ADAPTER_NAME].weight.copy_(tensors["lora_up.weight"])
    if "dora_scale" in tensors:
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight
        magnitude.copy_(tensors["dora_scale"].reshape(magnitude.shape))
