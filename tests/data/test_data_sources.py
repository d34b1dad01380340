"""Every source layout ends up as the same records: folders, kohya repeats, metadata, HF files, mixes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
from PIL import Image

from finetune.config.errors import DataError
from finetune.config.schema import DataConfig, SourceConfig
from finetune.data import find_records
from finetune.data.sampler import BucketBatchSampler


def image(path: Path, size=(32, 32), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def cfg(**overrides) -> DataConfig:
    return DataConfig(**{"resolution": 32, "random_flip": False, **overrides})


def by_key(result) -> dict:
    return {record.key: record for record in result.records}


def test_nested_folders_with_txt_and_caption_sidecars(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("from txt")
    image(tmp_path / "deep" / "er" / "b.jpg")
    (tmp_path / "deep" / "er" / "b.caption").write_text("from caption\n")
    image(tmp_path / "both.webp")
    (tmp_path / "both.txt").write_text("txt wins")
    (tmp_path / "both.caption").write_text("caption loses")
    records = by_key(find_records(cfg(path=str(tmp_path))))
    assert {k: r.caption for k, r in records.items()} == {
        "a.png": "from txt",
        "deep/er/b.jpg": "from caption",
        "both.webp": "txt wins",
    }
    assert all(r.size == (32, 32) and r.repeats == 1 for r in records.values())


def test_kohya_repeat_folders_repeat_and_caption_by_folder_name(tmp_path):
    image(tmp_path / "10_zkz style" / "a.png")
    (tmp_path / "10_zkz style" / "a.txt").write_text("a red circle, zkz style")
    image(tmp_path / "10_zkz style" / "b.png")  # no sidecar: kohya captions it with the folder's name
    image(tmp_path / "2_regular" / "c.png")
    (tmp_path / "2_regular" / "c.txt").write_text("a circle")
    records = by_key(find_records(cfg(path=str(tmp_path))))
    assert {k: (r.caption, r.repeats) for k, r in records.items()} == {
        "10_zkz style/a.png": ("a red circle, zkz style", 10.0),
        "10_zkz style/b.png": ("zkz style", 10.0),
        "2_regular/c.png": ("a circle", 2.0),
    }
    # The sampler shows each image `repeats` times per epoch.
    result = find_records(cfg(path=str(tmp_path)))
    sampler = BucketBatchSampler([0] * 3, [r.repeats for r in result.records], batch_size=1, seed=0)
    counts = sorted(sampler.epoch_samples(0).tolist().count(i) for i in range(3))
    assert counts == [2, 10, 10]


def test_metadata_csv_and_jsonl_layouts(tmp_path):
    for layout in ("csv", "jsonl"):
        root = tmp_path / layout
        image(root / "imgs" / "x.png")
        if layout == "csv":
            (root / "metadata.csv").write_text('file_name,text\nimgs/x.png,"a, b"\n')
        else:
            (root / "metadata.jsonl").write_text(
                json.dumps({"file_name": "imgs/x.png", "text": "a, b"}) + "\n"
            )
        records = find_records(cfg(path=str(root))).records
        assert [(r.key, r.caption) for r in records] == [("imgs/x.png", "a, b")]


def _rows(tmp_path: Path) -> datasets.Dataset:
    paths = [str(image(tmp_path / "src" / f"{i}.png", colour=(50 * i, 0, 0))) for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": paths, "text": ["x0", "x1", None]}, features=features)


def test_hf_parquet_and_arrow_files_and_saved_folders(tmp_path):
    rows = _rows(tmp_path)
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    rows.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for name in (tmp_path / "rows.parquet", arrow, tmp_path / "saved"):
        result = find_records(
            cfg(source="hf", name=str(name), missing_caption="default", default_caption="dflt")
        )
        assert [r.caption for r in result.records] == ["x0", "x1", "dflt"], name
        assert [r.size for r in result.records] == [(32, 32)] * 3
        assert result.records[1].load().getpixel((0, 0)) == (50, 0, 0)
        assert result.uncaptioned == 1


def test_sources_mix_with_weights(tmp_path):
    image(tmp_path / "a" / "1.png")
    image(tmp_path / "a" / "2.png")
    image(tmp_path / "b" / "1.png")
    sources = [
        SourceConfig(path=str(tmp_path / "a"), weight=0.5),
        SourceConfig(path=str(tmp_path / "b"), weight=3),
    ]
    result = find_records(cfg(sources=sources, missing_caption="empty"))
    assert {r.key: r.repeats for r in result.records} == {"0:1.png": 0.5, "0:2.png": 0.5, "1:1.png": 3.0}
    sampler = BucketBatchSampler([0] * 3, [r.repeats for r in result.records], batch_size=1, seed=0)
    for epoch in range(4):  # half of source a per epoch (one of its two images), three times source b
        shown = sampler.epoch_samples(epoch).tolist()
        assert shown.count(2) == 3 and shown.count(0) + shown.count(1) == 1
    with pytest.raises(DataError, match="data.sources"):
        find_records(cfg(sources=sources, path=str(tmp_path / "a")))


@pytest.mark.parametrize("policy", ["skip", "empty", "default", "error"])
def test_missing_caption_policy(tmp_path, policy):
    image(tmp_path / "with.png")
    (tmp_path / "with.txt").write_text("captioned")
    image(tmp_path / "without.png")
    config = cfg(path=str(tmp_path), missing_caption=policy, default_caption="a default")
    if policy == "error":
        with pytest.raises(DataError, match="without.png"):
            find_records(config)
        return
    result = find_records(config)
    captions = {r.key: r.caption for r in result.records}
    assert captions["with.png"] == "captioned"
    if policy == "skip":
        assert "without.png" not in captions
        assert [(s.key, "no caption" in s.reason) for s in result.skipped] == [("without.png", True)]
    else:
        assert captions["without.png"] == ("a default" if policy == "default" else "")
        assert any("have no caption" in note for note in result.notes)


def test_caption_in_a_legacy_encoding_is_read_and_noted(tmp_path):
    image(tmp_path / "cafe.png")
    (tmp_path / "cafe.txt").write_bytes("café, crème brûlée".encode("cp1252"))
    image(tmp_path / "bom.png")
    (tmp_path / "bom.txt").write_bytes("\ufeffwith bom".encode())
    result = find_records(cfg(path=str(tmp_path)))
    assert {r.key: r.caption for r in result.records} == {
        "cafe.png": "café, crème brûlée",
        "bom.png": "with bom",
    }
    assert [(f.key, "read as cp1252" in f.what) for f in result.fixed] == [("cafe.png", True)]


def test_symlinks_out_of_the_root_are_refused_and_reported(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    image(root / "inside.png")
    image(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linked_folder")
    os.symlink(root, root / "loop")  # a folder linking back inside: followed once, not forever
    result = find_records(cfg(path=str(root)))
    assert [r.key for r in result.records] == ["inside.png"]
    reasons = {s.key: s.reason for s in result.skipped}
    assert "outside the dataset root" in reasons["link.png"]
    assert "outside the dataset root" in reasons["linked_folder/"]
