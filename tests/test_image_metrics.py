"""FID and KID of held-out captions' samples against the held-out images, from local Inception weights."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides

from finetune.train import train


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the layout of torch-fidelity's Inception file (the real one is 91 MB)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # keep the random init
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(folder / "empty.pth"))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(network.state_dict(), folder / "inception.pth")
    return folder / "inception.pth"


def _overrides(tiny_model: Path, run_dir: Path, weights: Path) -> list[str]:
    return fast_overrides(tiny_model, run_dir, steps=2) + [
        "data.holdout=3",
        "validation.every_n_steps=0",
        f"validation.inception_weights={weights}",
    ]


@pytest.mark.slow
def test_fid_and_kid_reach_the_dashboard_at_the_end(
    tiny_model: Path, inception_weights: Path, tmp_path: Path
):
    run = train(compose_config(_overrides(tiny_model, tmp_path, inception_weights)))
    with open(run.run_dir / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/kid")]
    assert len(rows) == 1 and int(rows[0]["step"]) == 2
    assert float(rows[0]["val/fid"]) == pytest.approx(run.metrics["val/fid"])
    assert run.metrics["val/fid"] >= 0 and torch.isfinite(torch.tensor(run.metrics["val/kid"]))


def test_missing_inception_weights_are_skipped_with_a_notice(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING):
        run = train(compose_config(_overrides(tiny_model, tmp_path, tmp_path / "missing.pth")))
    assert "FID/KID skipped" in caplog.text
    assert "val/fid" not in run.metrics and (run.run_dir / "adapter").is_dir()
