"""Config checks run before anything heavy: one line naming the key and the fix.

Some need the model's shape, which is read from its config files, never by loading weights.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune.errors import ConfigError
from finetune.value_checks import check_values, lightning_precisions


def check_config(cfg: Any) -> None:
    """Fail with one line naming the key when a value or a combination of values cannot work."""
    check_values(cfg)
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
        if cfg.model.attention == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ConfigError("model.attention: 'xformers' needs the xformers package — or use sdpa")
    if OmegaConf.select(cfg, "optim.name", default=None) is not None:
        from finetune.optimizers import check_optimizer

        check_optimizer(cfg.optim.name)
    check_strategy(cfg)
    check_precision(cfg)


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
        if OmegaConf.select(cfg, "model.compile", default=False):
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


# Every Stable Diffusion VAE (1.x, 2.x, XL) halves the image three times.
DEFAULT_VAE_FACTOR = 8


def vae_factor(model: Any) -> int:
    """How many pixels make one latent: from `vae/config.json` of a local folder or a cached hub
    model; SD's 8 for anything else (single files, hub ids not yet downloaded)."""
    config = _vae_config_file(str(model.pretrained or ""), model.revision)
    if config is None:
        return DEFAULT_VAE_FACTOR
    channels = json.loads(config.read_text()).get("block_out_channels", [0] * 4)
    return 2 ** (len(channels) - 1)


def _vae_config_file(pretrained: str, revision: str | None) -> Path | None:
    return _model_file(pretrained, "vae/config.json", revision)


def _model_file(pretrained: str, name: str, revision: str | None) -> Path | None:
    """A file of a local diffusers folder, or of a hub model already in the local cache, or None."""
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        path = folder / name
        return path if path.is_file() else None
    if pretrained.count("/") != 1 or folder.suffix:  # not a hub id (e.g. a .safetensors file)
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(pretrained, name, revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def is_sdxl_model(model: Any) -> bool | None:
    """Whether `model.pretrained` is SDXL (from a folder's model_index.json, or a .safetensors file's
    key names); None if unknown."""
    single_file = Path(str(model.pretrained or "")).expanduser()
    if single_file.suffix == ".safetensors" and single_file.is_file():
        from safetensors import safe_open

        with safe_open(str(single_file), "pt") as weights:  # reads the header only
            # SDXL's original layout keeps its second text encoder (OpenCLIP) under this prefix.
            return any(key.startswith("conditioner.embedders.1.") for key in weights.keys())
    index = _model_file(str(model.pretrained or ""), "model_index.json", model.revision)
    if index is None:
        return None
    return index_is_sdxl(json.loads(index.read_text()))


def index_is_sdxl(index: dict) -> bool:
    """A pipeline's model_index.json names a second text encoder only for SDXL."""
    entry = index.get("text_encoder_2")
    return bool(entry) and entry[0] is not None


def check_latent_shapes(cfg: Any) -> None:
    """Training sizes must map to whole latents, or the VAE would silently crop or pad them."""
    factor = vae_factor(cfg.model)
    data = cfg.data
    if data.resolution % factor:
        lower = data.resolution // factor * factor
        raise ConfigError(
            f"data.resolution: {data.resolution} is not a multiple of the VAE factor {factor} — "
            f"use {lower} or {lower + factor}"
        )
    if data.buckets and data.bucket_step % factor:
        raise ConfigError(
            f"data.bucket_step: {data.bucket_step} is not a multiple of the VAE factor {factor} — "
            f"bucket sides must be whole latents; use {max(factor, data.bucket_step // factor * factor)}"
        )
