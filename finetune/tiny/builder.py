"""Tiny Stable-Diffusion-architecture pipelines built in code.

Same classes and folder layout as a real SD 1.x model (cross-attention U-Net, AutoencoderKL, CLIP
text encoder and tokenizer, DDPM scheduler), or as SDXL (two text encoders, the second one's pooled
output and the image sizes conditioning the U-Net), small enough to train on a CPU in seconds. They
are saved as diffusers folders so that they load through the same `from_pretrained` path as real models.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from finetune.config.files import atomic_dir
from finetune.tiny.vocab import build_tokenizer

log = logging.getLogger(__name__)

TEXT_WIDTH = 32
# Two VAE blocks downsample by 2 (SD's four blocks downsample by 8): 32 px images -> 16x16 latents.
VAE_CHANNELS = (32, 64)


def build_tiny_pipeline(
    seed: int = 0, resolution: int = 32, unet_channels: tuple[int, ...] = (32, 64)
) -> StableDiffusionPipeline:
    """Randomly initialised tiny SD pipeline (deterministic for a given seed; the global random
    state is left as it was, so a run that builds it draws what a run that loads it draws).

    `unet_channels` sets the U-Net's levels; every level but the lowest has cross-attention, as in SD.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _tiny_pipeline(resolution, unet_channels)


def _tiny_pipeline(resolution: int, unet_channels: tuple[int, ...]) -> StableDiffusionPipeline:
    latent_size = resolution // 2 ** (len(VAE_CHANNELS) - 1)
    attention_levels = len(unet_channels) - 1
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * attention_levels + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * attention_levels,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _tiny_vae(resolution)
    scheduler = _tiny_scheduler()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch))
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# SDXL's U-Net adds to its time embedding: the pooled text (text encoder 2's projection) and six
# numbers (original size, crop top-left, target size), each embedded in this many channels.
SDXL_TIME_EMBED_DIM = 8


def build_tiny_sdxl_pipeline(seed: int = 0, resolution: int = 32) -> StableDiffusionXLPipeline:
    """Randomly initialised tiny SDXL pipeline (deterministic for a given seed; the global random state
    is left as it was): two CLIP text encoders whose penultimate layers are concatenated for
    cross-attention, and SDXL's `text_time` embedding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _tiny_sdxl_pipeline(resolution)


def _tiny_sdxl_pipeline(resolution: int) -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        sample_size=resolution // 2 ** (len(VAE_CHANNELS) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at full size
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=8,
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * SDXL_TIME_EMBED_DIM,
    )
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch))
    text_config = _tiny_text_config(tokenizer)
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(resolution),
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=_tiny_scheduler(),
    )


def _tiny_vae(resolution: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=resolution,
    )


def _tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _tiny_text_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def ensure_tiny_model(model: Any) -> None:
    """`model.build_tiny`: build the tiny random SD model at `model.pretrained` on first use. The entry
    points call this before loading, so the library itself never builds demo models."""
    path = Path(str(model.pretrained or "")).expanduser()
    if model.build_tiny and model.pretrained and not path.exists():
        log.info("Building the tiny random SD model at %s (first use only)", path)
        save_tiny_pipeline(path)


def save_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors)."""
    return _save_once(build_tiny_pipeline, directory, seed)


def save_tiny_sdxl_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build the tiny SDXL pipeline and save it as a diffusers folder (safetensors)."""
    return _save_once(build_tiny_sdxl_pipeline, directory, seed)


def _save_once(build: Callable[[int], DiffusionPipeline], directory: Path, seed: int) -> Path:
    """Save atomically: the folder appears complete or not at all. Ranks that torchrun starts together
    may all build it; the first rename wins and the others, having built the same weights, keep it."""
    directory = Path(directory)
    try:
        with atomic_dir(directory) as partial:
            build(seed).save_pretrained(partial, safe_serialization=True)
    except OSError:  # FileExistsError, or the rename found another process's folder in place
        if not (directory / "model_index.json").is_file():
            raise
    return directory
