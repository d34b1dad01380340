"""The optimizer named by `optim.name`: AdamW (fused on CUDA), 8-bit AdamW, Adafactor or Prodigy."""

from __future__ import annotations

import importlib.util
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


def build_optimizer(cfg: Any, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    check_optimizer(cfg.name)
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        on_cuda = all(p.is_cuda for p in parameters)
        fused = on_cuda if cfg.fused is None else bool(cfg.fused)  # one kernel for all parameters
        return torch.optim.AdamW(
            parameters, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused
        )
    if cfg.name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            parameters, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.eps
        )
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate, scheduled like the others, rather than Adafactor's own relative steps.
        return Adafactor(
            parameters, lr=cfg.lr, scale_parameter=False, relative_step=False, weight_decay=cfg.weight_decay
        )
    from prodigyopt import Prodigy

    # Prodigy estimates the step size itself; `optim.lr` scales it (1.0 is the authors' advice).
    return Prodigy(parameters, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
