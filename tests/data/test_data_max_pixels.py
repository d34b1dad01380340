"""One pixel limit, data.max_pixels, at screening and at every decode — never PIL's global default."""

from __future__ import annotations

import dataclasses
import io
import pickle

import datasets
import pytest
import torch
from conftest import compose_config, fast_overrides
from PIL import Image

from finetune.config.schema import DataConfig
from finetune.data import ImageDecodeError, find_records
from finetune.data.images import decode_value
from finetune.data.streaming import StreamingCaptionedImages
from finetune.tiny.vocab import build_tokenizer
from finetune.train import train

PIL_LIMIT = 1000  # PIL refuses above 2 x 1000 pixels: each 64 x 64 test image is a "bomb" to PIL


def _png(size=(64, 64), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root, count=4, conditioning=False):
    root.mkdir()
    for i in range(count):
        (root / f"{i}.png").write_bytes(_png(colour=(60 * i, 30, 30)))
        (root / f"{i}.txt").write_text(f"a red square {i}")
    if conditioning:
        (root.parent / "edges").mkdir()
        for i in range(count):
            (root.parent / "edges" / f"{i}.png").write_bytes(_png(colour=(0, 0, 0)))
    return root


def _rows(path, count=3):
    rows = {"image": [{"bytes": _png(), "path": None}] * count, "text": [f"row {i}" for i in range(count)]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture
def pil_refuses_64px(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIL_LIMIT)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(_png()))  # the premise: PIL alone refuses these images


def test_a_raised_limit_admits_images_pil_would_refuse(tmp_path, pil_refuses_64px):
    root = _folder(tmp_path / "data", conditioning=True)
    cfg = DataConfig(
        path=str(root), resolution=32, max_pixels=10_000, conditioning_path=str(tmp_path / "edges")
    )
    result = find_records(cfg)  # screening: headers read from 8 threads at once
    assert not result.skipped and len(result.records) == 4
    for record in result.records:
        assert record.load().size == (64, 64) and record.conditioning().size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == PIL_LIMIT  # PIL's own setting is left as it was


def test_dataset_and_streamed_rows_follow_data_max_pixels(tmp_path, pil_refuses_64px):
    path = _rows(tmp_path / "rows.parquet")
    cfg = DataConfig(source="hf", name=str(path), resolution=32, max_pixels=10_000)
    records = find_records(cfg).records
    assert [record.load().size for record in records] == [(64, 64)] * 3
    streamed = dataclasses.replace(cfg, streaming=True, shuffle=False)
    stream = StreamingCaptionedImages(streamed, build_tokenizer(tmp_path / "t"), seed=0)
    stream.passes = 1
    assert len(list(stream)) == 3 and stream.skipped == 0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, before our refusal
def test_images_over_data_max_pixels_are_refused_when_decoded_too(tmp_path, monkeypatch, caplog):
    root = _folder(tmp_path / "data", count=1)
    record = find_records(DataConfig(path=str(root), resolution=32, max_pixels=5000)).records[0]
    (root / "0.png").write_bytes(_png(size=(128, 128)))  # replaced after the scan: 16,384 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's global says nothing ...
    for loader in (record.load, pickle.loads(pickle.dumps(record.load))):  # ... workers get a copy
        with pytest.raises(ImageDecodeError, match="16,384 pixels is over data.max_pixels=5,000"):
            loader()
    with pytest.raises(ImageDecodeError, match="over data.max_pixels=5,000"):
        decode_value({"bytes": _png(size=(128, 128)), "path": None}, "row 0", max_pixels=5000)
    stream_cfg = DataConfig(
        source="hf",
        name=str(_rows(tmp_path / "r.parquet", 1)),
        streaming=True,
        shuffle=False,
        max_pixels=4000,
    )
    stream = StreamingCaptionedImages(stream_cfg, build_tokenizer(tmp_path / "t"), seed=0)
    stream.passes = 1
    assert list(stream) == [] and stream.skipped == 1
    assert "64 x 64 = 4,096 pixels is over data.max_pixels=4,000" in caplog.text


@pytest.mark.slow
def test_training_decodes_images_pil_would_refuse(tiny_model, tmp_path, pil_refuses_64px):
    root = _folder(tmp_path / "data")
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=2) + [
        f"data.path={root}",
        "data.resolution=32",
        "data.max_pixels=10000",
        "data.num_workers=1",  # decoded in a worker process
        "validation.every_n_steps=0",
    ]
    result = train(compose_config(overrides))
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.metrics["train/loss"]))
