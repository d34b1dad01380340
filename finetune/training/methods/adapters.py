"""The LoRA family on a model, through peft: LoRA, LoCon (LoRA on convolutions too), LoHa, LoKr, DoRA.

All five live inside the model's own modules (peft wraps each targeted layer), so DDP, FSDP
sharding, checkpoints, exact resume and sample grids treat them like plain LoRA. Exports write each
in the layout A1111 and ComfyUI read (`finetune.export.kohya_layout`).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig

from finetune.config.errors import ConfigError
from finetune.config.methods import LoraAlgo, LoraMethodConfig

# The U-Net's convolutions that `method.conv_rank` adapts: the ResNet blocks' and the samplers', as
# kohya's and LyCORIS's LoCon do. (The attention blocks' 1x1 proj_in/out follow `target_modules`.)
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def conv_rank(cfg: LoraMethodConfig) -> int | None:
    """The rank on convolutions: `conv_rank`, else `rank` for locon; None: convolutions do not train."""
    if cfg.conv_rank is not None:
        return cfg.conv_rank
    return cfg.rank if cfg.algo == LoraAlgo.locon else None


def adapter_config(
    cfg: LoraMethodConfig, targets: list[str], *, convs: bool, layers: list[int] | None = None
) -> PeftConfig:
    """peft's config for `cfg.algo` on `targets` (and on the U-Net's convolutions when `convs` and a
    conv rank is set); `layers`: only these numbered layers of a text encoder."""
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    modules, rank_pattern, alpha_pattern = list(targets), {}, {}
    rank_on_convs = conv_rank(cfg) if convs else None
    if rank_on_convs is not None:
        conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else rank_on_convs
        modules += [name for name in CONV_TARGETS if name not in modules]
        rank_pattern = {name: rank_on_convs for name in CONV_TARGETS}
        alpha_pattern = {name: conv_alpha for name in CONV_TARGETS}
    common = dict(
        r=cfg.rank,
        target_modules=modules,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
    )
    if cfg.algo == LoraAlgo.loha:
        return LoHaConfig(
            alpha=alpha, rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout, **common
        )
    if cfg.algo == LoraAlgo.lokr:
        return LoKrConfig(
            alpha=alpha,
            rank_dropout=cfg.rank_dropout,
            module_dropout=cfg.module_dropout,
            decompose_factor=cfg.lokr_factor,
            decompose_both=cfg.lokr_decompose_both,
            **common,
        )
    return LoraConfig(
        lora_alpha=alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=cfg.init_weights,
        use_dora=cfg.algo == LoraAlgo.dora,
        **common,
    )


def attach(model: torch.nn.Module, config: PeftConfig) -> None:
    """Freeze `model` and attach a trainable float32 adapter named "default"."""
    model.requires_grad_(False)
    model.add_adapter(config)
    # peft creates the adapter in the base weights' dtype; train it in float32 (diffusers' advice).
    cast_training_params(model, dtype=torch.float32)


def add_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float | None,
    target_modules: list[str],
    dropout: float = 0.0,
    init_weights: str | bool = "gaussian",
) -> None:
    """Plain LoRA on `target_modules` (ControlNet's adapters, and tests)."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        init_lora_weights=init_weights,
    )
    attach(model, config)


def check_algo(method: LoraMethodConfig, loraplus_ratio: float | None) -> None:
    """Knobs that do not belong to `method.algo` fail in one line, before any model loads."""
    algo = LoraAlgo.of(method.algo, "method.algo")
    low_rank_pair = algo in (LoraAlgo.lora, LoraAlgo.locon, LoraAlgo.dora)
    if not low_rank_pair and method.dropout:
        raise ConfigError(
            f"method.dropout: not used by algo={algo}; set method.rank_dropout or module_dropout"
        )
    if low_rank_pair and (method.rank_dropout or method.module_dropout):
        raise ConfigError(
            f"method.rank_dropout / module_dropout: for loha and lokr; algo={algo} uses method.dropout"
        )
    if not low_rank_pair and loraplus_ratio is not None:
        raise ConfigError(
            f"optim.loraplus_ratio: LoRA+ speeds up LoRA's B matrices, which algo={algo} has not"
        )
    if method.lokr_factor == 0 or method.lokr_factor < -1:
        raise ConfigError(
            f"method.lokr_factor: {method.lokr_factor} must be -1 (as square as possible) or above 0"
        )
