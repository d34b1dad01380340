"""Speed settings for the models: attention kernels, memory layout, TF32 and torch.compile.

Each is a `model.*` key; the defaults are the fastest choices that are safe everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from finetune.config.schema import Attention, CompileScope

log = logging.getLogger(__name__)

# Regional compilation compiles one function, BasicTransformerBlock.forward, for every block, and dynamo
# allows a function 8 compiles by default. A block is compiled again for each width, for sampling (no
# gradients), for the first block (its input needs no gradient) and once more when a new bucket makes a
# shape dynamic: SD 1.5 with buckets and sample grids needs 9 (measured), and past the limit the blocks
# silently run uncompiled. Those few cases bound the count, so a higher limit cannot run away.
BLOCK_RECOMPILE_LIMIT = 64

# model.compile=auto compiles GPU runs of at least this many steps. Measured for SD 1.5 at 512 px,
# batch 8, bf16, cached latents on an H200 (README, Speed): a cold compile costs about 2 minutes and
# takes a step from 0.16 s to 0.12 s (48.9 -> 67.9 images/s), so it pays after about 120 / 0.04 steps.
AUTO_COMPILE_STEPS = 3000


def uses_cuda(accelerator: str) -> bool:
    """Whether the run will train on a CUDA GPU (as Lightning picks for `trainer.accelerator`)."""
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def runs_on_cpu(accelerator: str) -> bool:
    """Whether Lightning trains on the CPU for `trainer.accelerator` (auto: when there is no GPU)."""
    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()


def cpu_runs_bf16_natively() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them oneDNN emulates bf16:
    on an AVX2 CPU a 1024 x 1024 matmul took 100x, a 320-channel convolution 500x as long as in float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: cannot tell, so no warning
        return True


def warn_about_bf16_on_this_cpu(setting: str, instead: str) -> None:
    """One warning when bf16 would run emulated on this CPU: a run that never seems to start otherwise."""
    if not cpu_runs_bf16_natively():
        log.warning(
            "%s on a CPU without bf16 instructions (%s): bf16 is emulated here, matmuls and convolutions "
            "take 100x as long or more — set %s",
            setting,
            torch.backends.cpu.get_cpu_capability(),
            instead,
        )


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
        scope = CompileScope.of(cfg.compile_scope, "model.compile_scope")
        for model in denoisers:
            compile_denoiser(model, scope)
        log.info(
            "model.compile (%s): the first steps compile the U-Net and are slow; later steps are faster",
            scope,
        )


def compile_denoiser(model: torch.nn.Module, scope: CompileScope) -> None:
    """torch.compile a U-Net or ControlNet in place (nn.Module.compile: weight names, peft and export
    see the same modules). `blocks` compiles each transformer block on its own (regional compilation):
    blocks of the same width and token count share one compiled graph (SD 1.5's sixteen blocks come in
    four, SDXL's seventy in two). The blocks hold the attention, the LoRA layers and most of the elementwise
    work; the ResNet blocks between them stay eager (each has its own channel counts, which would mean
    a compile per block)."""
    if scope == CompileScope.full:
        model.compile()
        return
    blocks = [module for module in model.modules() if isinstance(module, BasicTransformerBlock)]
    if not blocks:  # a denoiser without transformer blocks: nothing repeats, compile it whole
        model.compile()
        return
    # cache_size_limit: the name torch 2.6 has; newer versions keep it for their recompile_limit
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, BLOCK_RECOMPILE_LIMIT)
    for block in blocks:
        block.compile()


def set_attention(model: torch.nn.Module, kind: Attention | str) -> None:
    kind = Attention.of(kind, "model.attention")
    if kind == Attention.xformers:
        model.enable_xformers_memory_efficient_attention()
    elif kind == Attention.sdpa:
        model.set_attn_processor(AttnProcessor2_0())
    else:
        model.set_attn_processor(AttnProcessor())
