"""A run stopped mid-epoch and resumed from its checkpoint trains on each sample of the epoch exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_config, fast_overrides
from PIL import Image

from finetune.train import train

IMAGES = 10


def _dataset(root: Path) -> Path:
    root.mkdir()
    for i in range(IMAGES):
        Image.new("RGB", (48 if i % 2 else 32, 32), (20 * i, 100, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def _run(tiny_model: Path, run_dir: Path, data: Path, seen: Path, steps: int, extra: list[str] = ()):
    overrides = fast_overrides(tiny_model, run_dir, steps=steps) + [
        f"data.path={data}",
        "data.num_workers=2",
        "data.buckets=true",
        "data.bucket_step=8",
        "data.random_flip=true",
        "trainer.accumulate_grad_batches=2",
        "checkpoint.every_n_steps=1",
        "validation.every_n_steps=0",
        "+callbacks.seen._target_=helpers.SeenSamples",
        f"+callbacks.seen.out_dir={seen}",
    ]
    return train(compose_config(overrides + list(extra)))


def _batches(seen: Path) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in (seen / "rank0.txt").read_text().splitlines()]


@pytest.mark.slow
def test_stop_mid_epoch_and_resume_sees_each_sample_once(tiny_model, tmp_path):
    data = _dataset(tmp_path / "data")
    # Uninterrupted: two buckets of 5 images make 6 batches (2 + 2 + 1 each) = 3 optimizer steps.
    whole = _run(tiny_model, tmp_path / "whole", data, tmp_path / "seen_whole", steps=3)
    assert whole.global_step == 3
    uninterrupted = _batches(tmp_path / "seen_whole")
    assert Counter(i for batch in uninterrupted for i in batch) == Counter(range(IMAGES))

    # A crash right after the checkpoint of step 1 (2 batches in), then a resume in the same folder.
    crash = ["+callbacks.crash._target_=helpers.CrashAtStep", "+callbacks.crash.step=1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny_model, tmp_path / "run", data, tmp_path / "seen_run", steps=3, extra=crash)
    assert len(_batches(tmp_path / "seen_run")) == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = _run(
        tiny_model, tmp_path / "run", data, tmp_path / "seen_run", steps=3, extra=[f"resume={checkpoint}"]
    )
    assert resumed.global_step == 3
    assert _batches(tmp_path / "seen_run") == uninterrupted  # same batches, same order, none twice
    assert not (tmp_path / "run" / "checkpoints" / "last-v1.ckpt").exists()
