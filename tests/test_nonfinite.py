"""Non-finite steps are skipped and counted, too many in a row stop the run, and nothing NaN is saved."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_config, fast_overrides
from safetensors.torch import load_file

from finetune.nonfinite import NonFiniteError
from finetune.train import train


def _poison(batches: list[int], what: str) -> list[str]:
    return [
        "+callbacks.poison._target_=helpers.PoisonSteps",
        f"+callbacks.poison.batches={batches}",
        f"+callbacks.poison.what={what}",
    ]


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_nan_step_is_skipped_and_nothing_saved_holds_nan(tiny_model, tmp_path, what):
    overrides = (
        fast_overrides(tiny_model, tmp_path, steps=4) + _poison([1], what) + ["data.random_flip=false"]
    )
    result = train(compose_config(overrides))
    assert result.global_step == 4  # the poisoned one is counted as a step, but changed nothing
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/skipped_steps")]
    skipped = [float(row["train/skipped_steps"]) for row in rows]
    assert skipped[0] == 0.0 and skipped[-1] == 1.0  # a dashboard series: the count of skipped steps
    for checkpoint in (tmp_path / "checkpoints").glob("*.ckpt"):
        weights = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert weights and all(torch.isfinite(w).all() for w in weights.values()), checkpoint
    exported = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in exported.values())
    lora_b = [w for name, w in exported.items() if "lora_B" in name]
    assert any(w.abs().sum() > 0 for w in lora_b)  # the good steps still trained


def test_too_many_nan_steps_in_a_row_stop_the_run_with_a_clear_message(tiny_model, tmp_path):
    overrides = fast_overrides(tiny_model, tmp_path, steps=6) + _poison(list(range(100)), "loss")
    overrides += ["optim.max_nonfinite_in_a_row=3"]
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite loss"):
        train(compose_config(overrides))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_skipped_step_changes_no_weight(tiny_model, tmp_path, what):
    overrides = fast_overrides(tiny_model, tmp_path, steps=1) + _poison([0], what) + ["optim.lr=1e-2"]
    result = train(compose_config(overrides))
    lora_b = [p for name, p in result.module.named_parameters() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # still their zero init
