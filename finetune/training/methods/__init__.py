"""Training methods: which weights train and how they are exported (`base.Method`): LoRA (`lora`),
the whole U-Net (`full`), a ControlNet (`controlnet`).

A method is a small object, not a training loop: the one `DiffusionModule` serves every method.
"""

from __future__ import annotations

from typing import Any

from finetune.config.errors import ConfigError
from finetune.training.methods.base import Method
from finetune.training.methods.controlnet import ControlNetMethod
from finetune.training.methods.full import FullMethod
from finetune.training.methods.lora import LoraMethod

METHODS = {"lora": LoraMethod, "full": FullMethod, "controlnet": ControlNetMethod}


def build_method(cfg: Any) -> Method:
    """The method named by `cfg.name`, built from its config node."""
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name: unknown method '{cfg.name}' — choose one of {', '.join(METHODS)}")
    return METHODS[cfg.name](cfg)
