"""The optimizer named by `optim.name`: AdamW (fused on CUDA), 8-bit AdamW, Adafactor or Prodigy."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from finetune.config.errors import ConfigError
from finetune.config.schema import Optimizer

# Optimizers from optional packages: the package that provides each.
OPTIONAL = {
    Optimizer.adamw_8bit: "bitsandbytes",
    Optimizer.adafactor: "transformers",
    Optimizer.prodigy: "prodigyopt",
}


def check_optimizer(name: Optimizer | str) -> None:
    """Fail before any model loads when the optimizer is unknown or its package is missing."""
    name = Optimizer.of(name, "optim.name")
    package = OPTIONAL.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"optim.name: '{name}' needs the {package} package — pip install {package}")


def parameter_groups(
    modules: Sequence[torch.nn.Module], text_encoders: Sequence[torch.nn.Module], cfg: Any
) -> list[dict[str, Any]]:
    """The trainable weights of `modules` in groups by learning rate: `optim.text_encoder_lr` for the
    text encoders' (else `optim.lr`), times `optim.loraplus_ratio` for LoRA's B matrices (LoRA+,
    Hayou et al. 2024: the up-projections learn best with a larger rate than the down-projections)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for module in modules:
        is_text = any(module is encoder for encoder in text_encoders)
        base = cfg.text_encoder_lr if is_text and cfg.text_encoder_lr is not None else cfg.lr
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                faster = cfg.loraplus_ratio is not None and ".lora_B." in name
                groups.setdefault(base * cfg.loraplus_ratio if faster else base, []).append(parameter)
    return [{"params": parameters, "lr": lr} for lr, parameters in groups.items()]


def build_optimizer(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer over `groups` (`parameter_groups`); `optim.lr` is the default rate."""
    check_optimizer(cfg.name)
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        on_cuda = all(p.is_cuda for group in groups for p in group["params"])
        fused = on_cuda if cfg.fused is None else bool(cfg.fused)  # one kernel for all parameters
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused
        )
    if cfg.name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate, scheduled like the others, rather than Adafactor's own relative steps.
        return Adafactor(
            groups, lr=cfg.lr, scale_parameter=False, relative_step=False, weight_decay=cfg.weight_decay
        )
    from prodigyopt import Prodigy

    # Prodigy estimates the step size itself; `optim.lr` scales it (1.0 is the authors' advice).
    return Prodigy(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
