"""CLIP score of the validation samples: logged when a CLIP model is at hand, else one notice."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import STYLE_DATA, compose_config, fast_overrides
from PIL import Image

from finetune.train import train
from finetune.validation.clip_score import SampleClipScore


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP with our locally built tokenizer, saved like a downloaded one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from finetune.tiny.vocab import build_tokenizer

    # torchmetrics' CLIPScore loads a folder by name only when the name says "openai".
    folder = tmp_path_factory.mktemp("clip") / "openai-tiny-clip"
    tokenizer = build_tokenizer(folder / "tokenizer")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            small,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            # The text feature is read at the first end-of-text token: CLIP's default id (49407) is
            # not in this vocabulary, and every prompt would be read at position 0 alike.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random CLIP every run, so the scores below repeat
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


def _style_pairs(count: int = 6) -> tuple[torch.Tensor, list[str]]:
    """The first `count` images of the shipped style set (32 px, uint8) and their captions."""
    files = sorted(STYLE_DATA.glob("*.png"))[:count]
    pixels = np.stack([np.array(Image.open(file).convert("RGB").resize((32, 32))) for file in files])
    captions = [file.with_suffix(".txt").read_text().strip() for file in files]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions


@torch.no_grad()
def _clip_scores_by_forward(folder: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 x cosine of each image and its prompt, from CLIPModel.forward's own normalised embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    out = model(**processor(text=prompts, images=list(images), return_tensors="pt", padding=True))
    return 100 * (out.image_embeds * out.text_embeds).sum(-1)


def test_clip_score_is_the_models_own_image_text_cosine(tiny_clip: Path):
    images, prompts = _style_pairs()
    reference = _clip_scores_by_forward(tiny_clip, images, prompts)
    assert reference.max() - reference.min() > 1  # the pairs differ, so a mix-up would show
    score = SampleClipScore(str(tiny_clip))
    pairs = [score(images[i : i + 1].float() / 255, prompts[i : i + 1]) for i in range(len(prompts))]
    assert pairs == pytest.approx(reference.clamp(min=0).tolist(), abs=1e-4)
    # torchmetrics' score of a batch: the mean over its pairs, clamped at 0.
    together = score(images.float() / 255, prompts)
    assert together == pytest.approx(max(float(reference.mean()), 0.0), abs=1e-4)


def test_clip_score_equals_torchmetrics_own_on_the_same_folder(tiny_clip: Path):
    from torchmetrics.multimodal import CLIPScore

    images, prompts = _style_pairs()
    try:
        theirs = CLIPScore(model_name_or_path=str(tiny_clip))(list(images), prompts)
    except AttributeError as error:
        # torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns model outputs,
        # which validation.clip_score._FeatureTensors bridges (checked against CLIP's own cosine above).
        pytest.skip(
            f"torchmetrics' CLIPScore cannot read transformers {transformers.__version__} models: {error}"
        )
    assert SampleClipScore(str(tiny_clip))(images.float() / 255, prompts) == pytest.approx(
        float(theirs), abs=1e-4
    )


def test_a_clip_model_that_will_not_load_is_skipped_with_one_notice(caplog: pytest.LogCaptureFixture):
    score = SampleClipScore("/no/such/clip")
    with caplog.at_level(logging.WARNING):
        assert score(torch.rand(1, 3, 32, 32), ["a red circle"]) is None
        assert score(torch.rand(1, 3, 32, 32), ["a red circle"]) is None
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "CLIP score skipped" in caplog.text
