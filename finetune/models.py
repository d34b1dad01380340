"""Load the components of a Stable Diffusion pipeline for training.

`model.pretrained` may be a hub id, a local diffusers folder or a single-file checkpoint
(.safetensors / .ckpt, as A1111 and ComfyUI use). Everything goes through diffusers'
`from_pretrained` / `from_single_file`, so the tiny model and real models share one path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from finetune.config import ModelConfig
from finetune.errors import ConfigError

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Components:
    """The parts of an SD pipeline that training needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str


def resolve_source(cfg: ModelConfig) -> str:
    """Where to load from; builds the tiny model first when asked to and it is not there yet."""
    if not cfg.pretrained:
        raise ConfigError(
            "model.pretrained is not set — give a hub id, a diffusers folder or a .safetensors file"
        )
    path = Path(cfg.pretrained).expanduser()
    if cfg.build_tiny and not path.exists():
        from finetune.tiny import save_tiny_pipeline

        log.info("Building the tiny random SD model at %s (first use only)", path)
        save_tiny_pipeline(path)
    if path.suffix in SINGLE_FILE_SUFFIXES and not path.is_file():
        raise ConfigError(f"model.pretrained: checkpoint file '{path}' does not exist")
    return str(path) if path.exists() else cfg.pretrained


def load_pipeline(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The whole pipeline, for sampling (`finetune-generate`) and single-file checkpoints."""
    source = resolve_source(cfg)
    common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if source.endswith(SINGLE_FILE_SUFFIXES):
        # Without `config`, diffusers guesses the architecture from the keys and fetches its configs.
        return StableDiffusionPipeline.from_single_file(source, config=cfg.single_file_config, **common)
    return StableDiffusionPipeline.from_pretrained(
        source, revision=cfg.revision, variant=cfg.variant, **common
    )


def load_components(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Components:
    """Load unet, vae, text encoder, tokenizer and the DDPM training scheduler, frozen, in `dtype`."""
    source = resolve_source(cfg)
    if source.endswith(SINGLE_FILE_SUFFIXES):
        pipe = load_pipeline(cfg, dtype)
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        kwargs = dict(revision=cfg.revision)
        weights = dict(kwargs, variant=cfg.variant, torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    if cfg.prediction_type is not None:
        set_prediction_type(scheduler, cfg.prediction_type)
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return Components(unet, vae, text_encoder, tokenizer, scheduler, source)


def set_prediction_type(scheduler: DDPMScheduler, prediction_type: str) -> None:
    """Override what the U-Net predicts (the scheduler config is the source of truth)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type: '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")
    scheduler.register_to_config(prediction_type=prediction_type)


def weight_dtype_for(precision: str | int | None) -> torch.dtype:
    """Dtype for the frozen weights under a Lightning precision setting (trainables stay fp32)."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32
