"""CLIP score of the validation samples: logged when a CLIP model is at hand, else one notice."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from conftest import compose_config, fast_overrides

from finetune.train import train


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP with our locally built tokenizer, saved like a downloaded one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from finetune.clip_vocab import build_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_tokenizer(folder / "tokenizer")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=77),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _scores(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = csv.DictReader(handle)
        return {int(r["step"]): float(r["val/clip_score"]) for r in rows if r.get("val/clip_score")}


@pytest.mark.slow
def test_samples_get_a_clip_score_on_the_dashboard(tiny_model: Path, tiny_clip: Path, tmp_path: Path):
    run = train(
        compose_config(fast_overrides(tiny_model, tmp_path, steps=2) + [f"validation.clip_model={tiny_clip}"])
    )
    scores = _scores(run.run_dir)
    assert sorted(scores) == [0, 2]  # with each sample grid
    assert all(0 <= score <= 100 for score in scores.values())


def test_a_clip_model_that_will_not_load_is_skipped_with_one_notice(caplog: pytest.LogCaptureFixture):
    import torch

    from finetune.clip_score import SampleClipScore

    score = SampleClipScore("/no/such/clip")
    with caplog.at_level(logging.WARNING):
        assert score(torch.rand(1, 3, 32, 32), ["a red circle"]) is None
        assert score(torch.rand(1, 3, 32, 32), ["a red circle"]) is None
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "CLIP score skipped" in caplog.text
