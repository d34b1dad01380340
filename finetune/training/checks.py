"""Config checks run before anything heavy: one line naming the key and the fix.

Some need the model's shape, which is read from its config files, never by loading weights. The
checks that need torch or the model libraries import them only once the plain value checks passed, so
that a wrong value is reported in a second, not after their imports.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import OmegaConf

from finetune.config.errors import ConfigError
from finetune.config.prior import check_prior
from finetune.config.values import check_values, lightning_precisions


def check_config(cfg: Any) -> None:
    """Fail with one line naming the key when a value or a combination of values cannot work."""
    check_values(cfg)
    from finetune.data.masks import ALPHA
    from finetune.models.layout import is_sdxl_model
    from finetune.models.prompts import check_clip_skip
    from finetune.training.methods.adapters import check_algo
    from finetune.training.methods.lora import read_init_from

    if OmegaConf.select(cfg, "method.name", default=None) == "controlnet":
        data = cfg.data
        if not (data.conditioning or data.conditioning_path or data.conditioning_column):
            raise ConfigError(
                "method=controlnet needs conditioning images: data.conditioning=canny, "
                "data.conditioning_path=<folder> or data.conditioning_column=<column>"
            )
        if data.streaming:
            raise ConfigError(
                "data.streaming: not available with method=controlnet — set data.streaming=false"
            )
    if OmegaConf.select(cfg, "method.name", default=None) == "lora":
        check_algo(cfg.method, OmegaConf.select(cfg, "optim.loraplus_ratio", default=None))
        read_init_from(cfg.method)  # the file is there, of the algorithm asked for
    if OmegaConf.select(cfg, "data.streaming", default=False):
        from finetune.data.streaming import check_streaming

        check_streaming(cfg.data, cfg.trainer.max_steps)
    if OmegaConf.select(cfg, "model", default=None) is not None:
        check_latent_shapes(cfg)
        if is_sdxl_model(cfg.model) and str(cfg.model.pretrained).endswith(".safetensors"):
            raise ConfigError(
                "model.pretrained: single-file SDXL checkpoints are not supported yet — give its diffusers "
                "folder or hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0)"
            )
        if cfg.model.clip_skip > 1 and is_sdxl_model(cfg.model):
            check_clip_skip(cfg.model.clip_skip, None, is_sdxl=True)  # refused before the model loads
        if cfg.model.attention == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ConfigError("model.attention: 'xformers' needs the xformers package — or use sdpa")
        check_schedule(cfg)
    if OmegaConf.select(cfg, "optim.name", default=None) is not None:
        from finetune.training.optimizers import check_optimizer

        check_optimizer(cfg.optim.name)
    prior = OmegaConf.select(cfg, "prior", default=None)
    if prior is not None and (prior.path or prior.num_images):
        check_prior(prior)
        masks = OmegaConf.select(cfg, "data.masks", default=None)
        if masks and masks != ALPHA:
            raise ConfigError(
                "prior.path: class images have no mask files — with prior preservation use data.masks=alpha"
            )
        if OmegaConf.select(cfg, "method.name", default=None) == "controlnet":
            raise ConfigError(
                "prior.path: prior preservation is for lora and full — class images have no "
                "conditioning images for method=controlnet"
            )
    if OmegaConf.select(cfg, "validation.prompts_file", default=None):
        from finetune.validation.prompt_library import sample_prompts

        sample_prompts(cfg.validation, cfg.data.resolution)  # the library reads, before any model loads
    check_strategy(cfg)
    check_precision(cfg)


def check_schedule(cfg: Any) -> None:
    """Zero terminal SNR cannot go with epsilon prediction: at the last timestep there is no image
    left in the input, so predicting its noise says nothing about the image."""
    if not cfg.model.zero_terminal_snr:
        return
    for key in ("model.prediction_type", "loss.prediction_type"):
        if OmegaConf.select(cfg, key, default=None) == "epsilon":
            raise ConfigError(
                f"{key}: epsilon cannot be learnt with model.zero_terminal_snr=true — use v_prediction "
                "(or leave it unset)"
            )


def check_precision(cfg: Any) -> None:
    """A precision Lightning knows, that can train here."""
    precision = str(cfg.trainer.precision)
    known = lightning_precisions()
    if precision not in known:
        raise ConfigError(f"trainer.precision: '{precision}' is not one of {', '.join(known)}")
    if precision == "16-true":
        # Lightning's 16-true casts the trained weights to float16 too, where AdamW's eps (1e-8)
        # is 0: the first step divides by zero and every weight becomes NaN.
        raise ConfigError(
            "trainer.precision: '16-true' trains the weights themselves in float16, where the optimizer "
            "turns them to NaN — use 16-mixed (the frozen weights are float16 there too) or bf16-mixed"
        )
    if precision.startswith("16") and _runs_on_cpu(str(cfg.trainer.accelerator)):
        raise ConfigError(
            f"trainer.precision: '{precision}' needs a CUDA GPU (float16 kernels are missing on CPU) — "
            "use bf16-mixed or 32-true on CPU"
        )


# What Lightning's ModelParallelStrategy (our trainer=fsdp) accepts.
FSDP_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "bf16-true")


def check_strategy(cfg: Any) -> None:
    """trainer=fsdp and trainer=deepspeed: what they cannot do yet, named before anything loads."""
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    precision = str(cfg.trainer.precision)
    if strategy == "fsdp":
        if precision not in FSDP_PRECISIONS:
            raise ConfigError(
                f"trainer.precision: '{precision}' is not available with trainer=fsdp — use bf16-mixed"
            )
        if OmegaConf.select(cfg, "model.compile", default=False) is True:
            raise ConfigError("model.compile: not available with trainer=fsdp yet — set model.compile=false")
        if OmegaConf.select(cfg, "method.name") == "full" and OmegaConf.select(cfg, "method.ema"):
            raise ConfigError(
                "method.ema: the EMA of sharded weights is not available with trainer=fsdp yet — "
                "set method.ema=false or use trainer=ddp"
            )
    if strategy.startswith("deepspeed_stage_3"):
        # ZeRO-3 partitions the weights themselves: every forward pass (each sample grid) and the export
        # would have to gather them on all ranks together.
        raise ConfigError(
            f"trainer.strategy: '{strategy}' (ZeRO-3) is not supported — use deepspeed_stage_2, or "
            "trainer=fsdp to shard the weights themselves"
        )
    if strategy.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"trainer.strategy: '{strategy}' needs the deepspeed package (pip install deepspeed)"
            )
        if _runs_on_cpu(str(cfg.trainer.accelerator)):
            raise ConfigError(
                f"trainer.strategy: '{strategy}' runs on CUDA GPUs only — use trainer=ddp on CPU"
            )


def _runs_on_cpu(accelerator: str) -> bool:
    if accelerator == "auto":
        import torch

        return not torch.cuda.is_available()
    return accelerator == "cpu"


def check_latent_shapes(cfg: Any) -> None:
    """Training sizes must map to whole latents, or the VAE would silently crop or pad them."""
    from finetune.models.layout import vae_factor

    factor = vae_factor(cfg.model)
    data = cfg.data
    resolutions = [("data.resolution", data.resolution)] + [
        (f"data.sources[{number}].resolution", source.resolution)
        for number, source in enumerate(data.sources or [])
        if source.resolution is not None
    ]
    for key, resolution in resolutions:
        if resolution % factor:
            lower = resolution // factor * factor
            raise ConfigError(
                f"{key}: {resolution} is not a multiple of the VAE factor {factor} — "
                f"use {lower} or {lower + factor}"
            )
    if data.buckets and data.bucket_step % factor:
        raise ConfigError(
            f"data.bucket_step: {data.bucket_step} is not a multiple of the VAE factor {factor} — "
            f"bucket sides must be whole latents; use {max(factor, data.bucket_step // factor * factor)}"
        )
