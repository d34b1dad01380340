"""Speed settings for the models: attention kernels, memory layout, TF32 and torch.compile.

Each is a `model.*` key; the defaults are the fastest choices that are safe everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from finetune.config.schema import Attention

log = logging.getLogger(__name__)


def uses_cuda(accelerator: str) -> bool:
    """Whether the run will train on a CUDA GPU (as Lightning picks for `trainer.accelerator`)."""
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def set_matmul_precision(cfg: Any, on_cuda: bool) -> None:
    """TF32 for float32 matmuls and convolutions on Ampere and newer: ~2-8x faster, 10-bit mantissa,
    which float32 master weights of mixed precision training tolerate (PyTorch's own advice)."""
    if on_cuda and cfg.tf32 and torch.cuda.get_device_capability()[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def apply_speed_settings(components: Any, cfg: Any) -> None:
    """Attention kernel, channels-last layout and compilation of the denoiser(s), after the method
    has added its layers (LoRA, ControlNet), so that those are compiled too."""
    denoisers = [m for m in (components.unet, components.controlnet) if m is not None]
    for model in denoisers:
        set_attention(model, cfg.attention)
    if cfg.channels_last:  # convolutions in NHWC: tensor cores' native layout; slower on most CPUs
        for model in [*denoisers, components.vae]:
            model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for model in denoisers:
            # In place (nn.Module.compile), so weight names, peft and export see the same module.
            model.compile()
        log.info("model.compile: the first steps compile the U-Net and are slow; later steps are faster")


def set_attention(model: torch.nn.Module, kind: Attention | str) -> None:
    kind = Attention.of(kind, "model.attention")
    if kind == Attention.xformers:
        model.enable_xformers_memory_efficient_attention()
    elif kind == Attention.sdpa:
        model.set_attn_processor(AttnProcessor2_0())
    else:
        model.set_attn_processor(AttnProcessor())
