"""`data.cache=auto` (the default): cache whatever trains the same with the cache as without it — in
memory under `data.cache_budget_gib`, on disk above it — and say what was decided, and why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finetune.config.data_schema import CacheMode
from finetune.data.records import ImageRecord
from finetune.data.source_settings import SourceStyle, source_styles
from finetune.models.layout import vae_scale_factor

GIB = 2**30


def auto_cache_mode(
    cfg: Any, records: Sequence[ImageRecord], sizes: Sequence[tuple[int, int]], vae: Any, prompts: Any
) -> tuple[CacheMode, str]:
    """What `data.cache=auto` does for this data and model: none, memory or disk, and why."""
    if cfg.streaming:
        return CacheMode.none, "a stream is read as it comes"
    styles = source_styles(cfg)
    if any(style.random_crop for style in styles):
        return (
            CacheMode.none,
            "random crops change every epoch, and a cache would keep one per image (data.crop)",
        )
    size = cache_bytes(records, sizes, styles, vae, prompts)
    budget = float(cfg.cache_budget_gib) * GIB
    amount = f"about {size / 2**20:,.0f} MiB of latents and text features"
    if size <= budget:
        return CacheMode.memory, f"{amount}, in memory (data.cache_budget_gib={cfg.cache_budget_gib:g})"
    return CacheMode.disk, f"{amount}, above data.cache_budget_gib={cfg.cache_budget_gib:g}: on disk"


def cache_bytes(
    records: Sequence[ImageRecord],
    sizes: Sequence[tuple[int, int]],
    styles: Sequence[SourceStyle],
    vae: Any,
    prompts: Any,
) -> int:
    """An estimate of the cache's size: each image's latent distribution (mean and log-variance, both
    flips when it may be flipped) and each distinct caption's text features."""
    factor, channels = vae_scale_factor(vae.config), vae.config.latent_channels
    latent_bytes = 2 * channels * vae.dtype.itemsize
    latents = sum(
        latent_bytes
        * (width // factor)
        * (height // factor)
        * (2 if styles[record.source].random_flip else 1)
        for record, (width, height) in zip(records, sizes, strict=True)
    )
    width = sum(model.config.hidden_size for model in prompts.models)
    captions = len({record.caption for record in records})
    text = captions * prompts.captions.length * width * prompts.text_encoder.dtype.itemsize
    return latents + text
