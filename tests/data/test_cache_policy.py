"""`data.cache=auto`: cache what trains the same with the cache as without, in memory under the budget,
on disk above it, and say which and why."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import STYLE_DATA

from finetune.config.schema import DataConfig, ModelConfig
from finetune.data import CaptionedImageDataModule
from finetune.data.cache_policy import auto_cache_mode, cache_bytes
from finetune.data.source_settings import source_styles
from finetune.models.loading import load_components


@pytest.fixture(scope="module")
def parts(tiny_model: Path):
    components = load_components(ModelConfig(pretrained=str(tiny_model)))
    return components.vae, components.prompts


def decide(parts, **settings) -> tuple[str, str]:
    data = DataConfig(path=str(STYLE_DATA), resolution=32, **settings)
    module = CaptionedImageDataModule(data, None, seed=0)
    return auto_cache_mode(data, module.records, module.sizes, *parts)


def test_auto_caches_in_memory_under_the_budget_and_on_disk_above_it(parts) -> None:
    mode, why = decide(parts)
    assert mode == "memory" and "MiB of latents and text features, in memory" in why
    assert decide(parts, cache_budget_gib=0)[0] == "disk"


def test_auto_does_not_cache_what_would_train_differently(parts) -> None:
    mode, why = decide(parts, crop="random")
    assert mode == "none" and "random crops" in why


def test_the_estimate_counts_both_flips_and_every_distinct_caption(parts) -> None:
    vae, prompts = parts
    data = DataConfig(path=str(STYLE_DATA), resolution=32, random_flip=False)
    module = CaptionedImageDataModule(data, None, seed=0)
    once = cache_bytes(module.records, module.sizes, source_styles(data), vae, prompts)
    flipped = DataConfig(path=str(STYLE_DATA), resolution=32, random_flip=True)
    twice = cache_bytes(module.records, module.sizes, source_styles(flipped), vae, prompts)
    latent = 2 * vae.config.latent_channels * 4 * (32 // 2) ** 2  # mean and log-variance, float32
    assert twice - once == latent * len(module.records)
