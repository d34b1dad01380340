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

# model.compile=auto compiles GPU runs of at least this many steps. Measured for SD 1.5 at 512 px,
# batch 8, bf16, cached latents on an H200 (README, Speed): a cold compile costs about 2 minutes and
# takes a step from 0.16 s to 0.12 s (48.9 -> 67.9 images/s), so it pays after about 120 / 0.04 steps.
AUTO_COMPILE_STEPS = 3000


def uses_cuda(accelerator: str) -> bool:
    """Whether the run will train on a CUDA GPU (as Lightning picks for `trainer.accelerator`)."""
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def set_matmul_precision(cfg: Any, on_cuda: bool) -> None:
    """TF32 for float32 matmuls and convolutions on Ampere and newer: ~2-8x faster, 10-bit mantissa,
    which float32 master weights of mixed precision training tolerate (PyTorch's own advice)."""
    if on_cuda and cfg.tf32 and torch.cuda.get_device_capability()[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compiles(setting: Any, on_cuda: bool, max_steps: int, sharded: bool = False) -> bool:
    """Whether `model.compile` (true, false or auto) compiles this run. Auto: on a CUDA GPU, for runs of
    at least AUTO_COMPILE_STEPS steps (or no step limit), where a compile's start-up is small next to
    the time it saves; never under FSDP, which does not combine with it yet."""
    if setting == "auto":
        return on_cuda and not sharded and (max_steps < 0 or max_steps >= AUTO_COMPILE_STEPS)
    return bool(setting)


def apply_speed_settings(components: Any, cfg: Any, compile_models: bool = False) -> None:
    """Attention kernel, channels-last layout and (with `compile_models`) torch.compile of the
    denoiser(s), after the method has added its layers (LoRA, ControlNet), so that those are compiled
    too."""
    denoisers = [m for m in (components.unet, components.controlnet) if m is not None]
    for model in denoisers:
        set_attention(model, cfg.attention)
    if cfg.channels_last:  # convolutions in NHWC: tensor cores' native layout; slower on most CPUs
        for model in [*denoisers, components.vae]:
            model.to(memory_format=torch.channels_last)
    if compile_models:
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
