"""SD 1.5-, SD 2.1- and SDXL-architecture pipelines with random weights, built here, for speed work.

The configs are the published `config.json` values of stable-diffusion-v1-5, stable-diffusion-2-1
and stable-diffusion-xl-base-1.0 (U-Net, VAE, CLIP text encoders, DDPM training schedule); speed does
not depend on the weights, so nothing is downloaded. `tests/test_full_size_*.py` use them too, to
check the single-file export at full size. The tokenizer is the project's offline CLIP BPE
tokenizer: prompts still become 77 token ids, so the text encoders do the same work.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from finetune.tiny.vocab import build_tokenizer

# What the SD1.5 and SDXL U-Nets share.
_UNET_SHARED: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}

SD15_UNET: dict[str, Any] = {
    **_UNET_SHARED,
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# SD 2.1 (768-v): SD 1.5's blocks, OpenCLIP-H's 1024-wide text states, linear transformer projections.
SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}

SDXL_UNET: dict[str, Any] = {
    **_UNET_SHARED,
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled text (1280) + 6 size/crop numbers x 256
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD21_VAE: dict[str, Any] = dict(SD15_VAE, sample_size=768)

SDXL_VAE: dict[str, Any] = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# CLIP ViT-L/14's text tower: SD 1.5's text encoder and SDXL's first one.
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# OpenCLIP ViT-H/14's text tower, SD 2.x's text encoder: 23 of its 24 layers, as SD 2 conditions on
# the penultimate one (diffusers' published config drops the last).
OPEN_CLIP_H_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

# OpenCLIP ViT-bigG/14's text tower: SDXL's second text encoder (its pooled output conditions the U-Net).
CLIP_BIGG_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

DDPM_TRAINING: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

# SD 2.1 (768-v) was trained to predict v, not the noise.
V_PREDICTION_TRAINING: dict[str, Any] = dict(DDPM_TRAINING, prediction_type="v_prediction")

ARCHITECTURES = ("sd15", "sd21", "sdxl")

# name -> U-Net, VAE, text encoder and training-schedule configs of the single-text-encoder architectures
_SD_PARTS: dict[str, tuple[dict[str, Any], ...]] = {
    "sd15": (SD15_UNET, SD15_VAE, CLIP_L_TEXT, DDPM_TRAINING),
    "sd21": (SD21_UNET, SD21_VAE, OPEN_CLIP_H_TEXT, V_PREDICTION_TRAINING),
}


def _text_config(values: dict[str, Any], tokenizer: Any) -> CLIPTextConfig:
    """The published text config, with the special-token ids of the tokenizer it is paired with."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**values, **ids)


def build_random_pipeline(name: str, tokenizer: Any) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The `name` architecture (one of `ARCHITECTURES`) with random weights, built on the current device."""
    if name in _SD_PARTS:
        unet, vae, text, schedule = _SD_PARTS[name]
        return StableDiffusionPipeline(
            unet=UNet2DConditionModel(**unet),
            vae=AutoencoderKL(**vae),
            text_encoder=CLIPTextModel(_text_config(text, tokenizer)),
            tokenizer=tokenizer,
            scheduler=DDPMScheduler(**schedule),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if name == "sdxl":
        return StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**SDXL_UNET),
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(_text_config(CLIP_L_TEXT, tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(CLIP_BIGG_TEXT, tokenizer)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            scheduler=DDPMScheduler(**DDPM_TRAINING),
        )
    raise ValueError(f"unknown architecture '{name}' — one of {', '.join(ARCHITECTURES)}")


def random_pipeline(
    name: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Build `name` with random weights made directly in `dtype` on `device` (fast on a GPU)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights made in the dtype they are used in: half the memory for bf16
    try:
        with torch.device(device):
            return build_random_pipeline(name, tokenizer)
    finally:
        torch.set_default_dtype(default)


def save_random_pipeline(name: str, folder: Path, dtype: torch.dtype, device: str, seed: int = 0) -> Path:
    """Build `name` with random weights in `dtype` on `device`; save it as a diffusers folder."""
    pipeline = random_pipeline(name, dtype, device, seed)
    pipeline.save_pretrained(folder, safe_serialization=True)
    del pipeline
    return folder
