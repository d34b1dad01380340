"""FID and KID of held-out captions' samples against the held-out images, from local Inception weights."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STYLE_DATA, compose_config, fast_overrides
from PIL import Image

from finetune.train import train
from finetune.validation.fidelity import fidelity_scores, kid_subset_size, load_inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in the layout of torch-fidelity's Inception file (the real one is 91 MB)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # keep the random init
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(folder / "empty.pth"))
            # The default init shrinks activations layer by layer to ~1e-7 features, which would make
            # every distance ~0; He init keeps them near 1, so distances between images mean something.
            for layer in network.modules():
                if isinstance(layer, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(network.state_dict(), folder / "inception.pth")
    return folder / "inception.pth"


def _style_images(count: int) -> torch.Tensor:
    """`count` images of the shipped style set, 32 px, uint8 [N, 3, H, W]."""
    files = sorted(STYLE_DATA.glob("*.png"))[:count]
    pixels = [np.array(Image.open(file).convert("RGB").resize((32, 32))) for file in files]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def scores(inception_weights: Path) -> dict[str, dict[str, float] | bool]:
    """fidelity_scores (what training logs) of 4 real images against themselves and against noise.

    On the Inception's 64-wide layer: FID's 2048x2048 eigendecomposition takes minutes on 2 CPUs;
    the slow end-to-end test below runs the 2048 features."""
    inception = load_inception(str(inception_weights), features=64)
    real = _style_images(4)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rng_before = torch.random.get_rng_state()
    same, against_noise = fidelity_scores(inception, real, real), fidelity_scores(inception, real, noise)
    rng_untouched = torch.equal(rng_before, torch.random.get_rng_state())
    return {"same": same, "noise": against_noise, "rng_untouched": rng_untouched}


def test_fid_is_zero_for_the_same_images_and_large_against_noise(scores: dict) -> None:
    noise = scores["noise"]["val/fid"]
    assert noise > 1
    assert scores["same"]["val/fid"] == pytest.approx(0, abs=1e-4 * noise)


def test_kid_is_zero_for_the_same_images_and_large_against_noise(scores: dict) -> None:
    noise = scores["noise"]["val/kid"]
    assert noise > 0.01
    assert abs(scores["same"]["val/kid"]) < 0.1 * noise


def test_kid_std_comes_from_subsets_that_differ(scores: dict) -> None:
    # Subsets as large as the set are all the whole set: the std is then rounding noise (~1e-7).
    assert scores["noise"]["val/kid_std"] > 1e-3 * scores["noise"]["val/kid"]
    assert scores["rng_untouched"]  # KID's subsets are drawn from a seeded RNG of their own


@pytest.mark.parametrize("count", [2, 3, 4, 8, 101])
def test_kid_subsets_hold_about_half_the_samples(count: int) -> None:
    size = kid_subset_size(count)
    assert 2 <= size <= count and (size < count or count == 2)
    assert size >= count // 2


def test_fewer_than_two_images_are_refused_clearly(inception_weights: Path) -> None:
    one = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 2"):
        fidelity_scores(load_inception(str(inception_weights)), one, one)


def _overrides(tiny_model: Path, run_dir: Path, weights: Path, holdout: int = 3) -> list[str]:
    return fast_overrides(tiny_model, run_dir, steps=2) + [
        f"data.holdout={holdout}",
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
    assert float(rows[0]["val/kid_std"]) == pytest.approx(run.metrics["val/kid_std"])
    assert run.metrics["val/fid"] >= 0 and torch.isfinite(torch.tensor(run.metrics["val/kid"]))


def test_missing_inception_weights_are_skipped_with_a_notice(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING):
        run = train(compose_config(_overrides(tiny_model, tmp_path, tmp_path / "missing.pth")))
    assert "FID/KID skipped" in caplog.text
    assert "val/fid" not in run.metrics and (run.run_dir / "adapter").is_dir()


@pytest.mark.slow
def test_a_single_held_out_image_skips_fid_and_kid_with_a_notice(
    tiny_model: Path, inception_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING):
        run = train(compose_config(_overrides(tiny_model, tmp_path, inception_weights, holdout=1)))
    assert "FID/KID need at least 2 held-out images" in caplog.text
    assert "val/fid" not in run.metrics and (run.run_dir / "adapter").is_dir()
