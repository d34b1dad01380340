"""Streaming HF datasets: rows decoded as they come, bad rows skipped, ranks disjoint, endless passes."""

from __future__ import annotations

import io
import itertools
import logging

import datasets
import pytest
import torch
from conftest import compose_config, fast_overrides
from PIL import Image

from finetune.config.errors import ConfigError, DataError
from finetune.config.schema import DataConfig
from finetune.data import CaptionedImageDataModule
from finetune.tiny.vocab import build_tokenizer
from finetune.train import train


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def parquet(tmp_path):
    rows = {
        "image": [{"bytes": _png((40 * i, 0, 0)), "path": None} for i in range(6)],
        "text": [f"row {i}" for i in range(6)],
    }
    rows["image"][2] = {"bytes": b"not an image", "path": None}
    rows["text"][4] = None
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def _parquet_files(folder, rows: int, files: int):
    """`rows` rows (row i is red 10 * i) spread over `files` parquet files: one shard each."""
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    for number in range(files):
        mine = range(number, rows, files)
        table = {"image": [{"bytes": _png((10 * i, 0, 0)), "path": None} for i in mine]}
        table["text"] = [f"row {i}" for i in mine]
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(folder / f"part{number}.parquet"))
    return folder if files > 1 else folder / "part0.parquet"


def _row(batch) -> int:
    return round((float(batch["pixel_values"][0, 0].mean()) + 1) * 127.5 / 10)


def _module(path, tokenizer, rank=0, world=1, **overrides):
    settings = dict(source="hf", name=str(path), streaming=True, resolution=32, batch_size=1, shuffle=False)
    settings.update(random_flip=False, missing_caption="skip")
    cfg = DataConfig(**{**settings, **overrides})
    module = CaptionedImageDataModule(cfg, tokenizer, seed=0)
    assert module.scan() == 0  # nothing is scanned ahead
    module.setup("fit")
    module.dataset.rank, module.dataset.world_size = rank, world
    return module


def test_stream_skips_bad_rows_and_starts_over(parquet, tmp_path, caplog):
    tokenizer = build_tokenizer(tmp_path / "tok")
    module = _module(parquet, tokenizer)
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(module.train_dataloader(), 8))
    reds = [round(float(b["pixel_values"][0, 0].mean()), 2) for b in batches]
    # Rows 0, 1, 3, 5 are good (2: not an image, 4: no caption); the second pass repeats them.
    expected = [round(40 * i / 127.5 - 1, 2) for i in (0, 1, 3, 5)]
    assert reds == expected + expected
    assert batches[0]["pixel_values"].shape == (1, 3, 32, 32)
    assert "cannot decode image" in caplog.text and "no caption" in caplog.text


def test_ranks_read_disjoint_parts_of_the_stream(parquet, tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    seen = []
    for rank in range(2):
        module = _module(parquet, tokenizer, rank=rank, world=2, missing_caption="empty")
        batches = itertools.islice(module.train_dataloader(), 2)
        seen.append({round(float(b["pixel_values"][0, 0].mean()), 2) for b in batches})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.parametrize("shards", [1, 4, 6, 7])
def test_ranks_and_workers_together_read_each_row_once_per_pass(tmp_path, monkeypatch, shards):
    # 2 ranks x 3 DataLoader workers: more readers than shards (1, 4), exactly one shard per worker
    # (6), and shards that split by worker but not evenly by rank (7).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # 5 s per pass, per reader
    path = _parquet_files(tmp_path / "data", rows=24, files=shards)
    tokenizer = build_tokenizer(tmp_path / "tok")
    seen = []
    for rank in range(2):
        module = _module(path, tokenizer, rank=rank, world=2, num_workers=3, shuffle=True)
        module.dataset.passes = 1
        seen += [_row(batch) for batch in module.train_dataloader()]
    assert sorted(seen) == list(range(24))


def test_workers_left_without_rows_end_and_the_others_read_every_row(tmp_path):
    path = _parquet_files(tmp_path / "data", rows=2, files=1)
    module = _module(path, build_tokenizer(tmp_path / "tok"), num_workers=3)
    module.dataset.passes = 1
    assert sorted(_row(batch) for batch in module.train_dataloader()) == [0, 1]


def test_streaming_refuses_what_it_cannot_do(tiny_model, tmp_path, parquet):
    base = fast_overrides(tiny_model, tmp_path, steps=2) + ["data.source=hf", f"data.name={parquet}"]
    with pytest.raises(ConfigError, match="data.buckets"):
        train(compose_config(base + ["data.streaming=true", "data.buckets=true"]))
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        train(compose_config(base + ["data.streaming=true", "trainer.max_steps=-1"]))
    with pytest.raises(DataError, match="data.caption_column: 'caption' not in"):  # before models load
        train(compose_config(base + ["data.streaming=true", "data.caption_column=caption"]))


@pytest.mark.slow
def test_training_on_a_stream(tiny_model, tmp_path, parquet):
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=3) + [
        "data.source=hf",
        f"data.name={parquet}",
        "data.streaming=true",
        "data.missing_caption=empty",
        "data.num_workers=2",  # one parquet file is one shard: more workers than shards
    ]
    result = train(compose_config(overrides))
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.metrics["train/loss"]))
