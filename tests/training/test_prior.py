"""DreamBooth prior preservation: class images drawn once by the base model, trained beside the
instance images with their own loss weight, and their loss logged apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, fast_overrides, logged_metric
from PIL import Image

from finetune.config.errors import ConfigError
from finetune.config.prior import PriorConfig
from finetune.config.schema import ModelConfig
from finetune.train import train
from finetune.training.class_images import ensure_class_images


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))}


def test_class_images_are_drawn_once_trained_as_regularisation_and_logged_apart(
    tiny_model: Path, tmp_path: Path
) -> None:
    classes = tmp_path / "class"
    prior = [
        f"prior.path={classes}",
        "prior.prompt=a red circle",
        "prior.num_images=3",
        "prior.num_inference_steps=2",
        "prior.loss_weight=0.5",
        "data.cache=auto",  # the default, which fast_overrides turns off
    ]
    run = train(compose_config(fast_overrides(tiny_model, tmp_path / "run", steps=3) + prior))

    drawn = pixels(classes)
    assert sorted(drawn) == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert {p.read_text() for p in classes.glob("*.txt")} == {"a red circle"}  # saved with its caption
    report = json.loads((run.run_dir / "data_report.json").read_text())
    assert any(note.startswith("data.cache=auto: memory") for note in report["notes"])  # the default
    counts = report["instance_and_regularisation"]
    assert counts["regularisation"]["images"] == 3
    assert counts["regularisation"]["samples_per_epoch"] == counts["instance"]["samples_per_epoch"]
    prior_loss, instance_loss = (
        logged_metric(run.run_dir, "train/prior_loss"),
        logged_metric(run.run_dir, "train/instance_loss"),
    )
    assert prior_loss and instance_loss and all(np.isfinite(list(prior_loss.values())))

    # A second run finds them and draws none; a larger set is topped up, image k still from seed + k.
    config = PriorConfig(path=str(classes), prompt="a red circle", num_images=3, num_inference_steps=2)
    model = ModelConfig(pretrained=str(tiny_model))
    assert ensure_class_images(config, model, 32, 42, "cpu", torch.float32) == 0
    assert pixels(classes).keys() == drawn.keys()
    config.num_images = 4
    assert ensure_class_images(config, model, 32, 42, "cpu", torch.float32) == 1
    at_once = tmp_path / "at_once"
    ensure_class_images(
        PriorConfig(**{**vars(config), "path": str(at_once)}), model, 32, 42, "cpu", torch.float32
    )
    assert {k: v.tobytes() for k, v in pixels(classes).items()} == {
        k: v.tobytes() for k, v in pixels(at_once).items()
    }


def test_prior_settings_that_cannot_work_are_named_before_anything_loads(tmp_path: Path) -> None:
    base = fast_overrides(tmp_path / "never", tmp_path / "run") + ["model.build_tiny=true"]
    for overrides, message in (
        (["prior.num_images=4"], "prior.num_images: set prior.path"),
        ([f"prior.path={tmp_path}", "prior.num_images=4"], "prior.prompt: the class prompt is needed"),
        ([f"prior.path={tmp_path / 'none'}"], "prior.path: '"),
    ):
        with pytest.raises(ConfigError, match=message):
            train(compose_config(base + overrides))
    assert not (tmp_path / "never").exists()


def test_nothing_is_drawn_when_the_data_cannot_train(tmp_path: Path) -> None:
    classes = tmp_path / "class"
    prior = [f"prior.path={classes}", "prior.prompt=a dog", "prior.num_images=2"]
    base = fast_overrides(tmp_path / "never", tmp_path / "run") + ["model.build_tiny=true"]
    with pytest.raises(ConfigError, match="prior.path: class images have no mask files"):
        train(compose_config(base + prior + [f"data.masks={tmp_path}"]))
    with pytest.raises(Exception, match="data.path"):
        train(compose_config(base + prior + [f"data.path={tmp_path / 'typo'}"]))
    assert not (tmp_path / "never").exists() and not list(classes.glob("*.png"))
