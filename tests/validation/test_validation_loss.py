"""Validation loss: held-out images, fixed timesteps and noise — the same number for the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, fast_overrides, logged_metric

from finetune.train import train


def _val_losses(run_dir: Path) -> dict[int, float]:
    return logged_metric(run_dir, "val/loss")


def _overrides(tiny_model: Path, run_dir: Path, steps: int) -> list[str]:
    return fast_overrides(tiny_model, run_dir, steps=steps) + [
        "data.holdout=3",
        "validation.every_n_steps=3",
        "validation.prompts=[]",
        "validation.loss_timesteps=[200,500,800]",
    ]


@pytest.mark.slow
def test_validation_loss_is_logged_on_held_out_images_and_repeats_for_the_same_weights(
    tiny_model: Path, tmp_path: Path
):
    seen = tmp_path / "seen"
    extra = ["+callbacks.seen._target_=helpers.SeenSamples", f"+callbacks.seen.out_dir={seen}"]
    run = train(compose_config(_overrides(tiny_model, tmp_path / "run", steps=6) + extra))
    losses = _val_losses(run.run_dir)
    assert sorted(losses) == [0, 3, 6]  # at the start, every 3 steps, and at the end
    assert run.metrics["val/loss"] == pytest.approx(losses[6])
    # The held-out images never reach training.
    data = run.module.trainer.datamodule
    held_out = {record.key for record, _ in data.holdout}
    batches = (seen / "rank0.txt").read_text().split()
    trained = {data.records[int(index)].key for index in batches}
    assert len(held_out) == 3 and not held_out & trained

    # Same base weights, images, timesteps and noise: the step-0 value repeats exactly.
    again = train(compose_config(_overrides(tiny_model, tmp_path / "again", steps=1)))
    assert _val_losses(again.run_dir)[0] == losses[0]


@pytest.mark.slow
def test_validation_loss_measures_the_ema_weights_that_samples_and_exports_use(
    tiny_model: Path, tmp_path: Path
):
    def final_and_first(ema: bool) -> tuple[float, float]:
        overrides = _overrides(tiny_model, tmp_path / f"ema_{ema}", steps=3) + [
            "method=full",
            f"method.ema={str(ema).lower()}",
            "method.ema_decay=0.5",
            "method.save_single_file=false",
            "optim.lr=1e-3",
        ]
        losses = _val_losses(train(compose_config(overrides)).run_dir)
        return losses[3], losses[0]

    # The EMA does not change training, so only the weights measured can make the numbers differ.
    (with_ema, start), (without, start_again) = final_and_first(True), final_and_first(False)
    assert start == start_again
    assert with_ema != without
