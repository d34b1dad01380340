"""The captioned-image pipeline: sources, safe decoding, transforms and batches."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from finetune.config.errors import DataError, FinetuneError
from finetune.config.schema import DataConfig
from finetune.data import CaptionedImageDataModule, ImageDecodeError, find_records, open_image, to_rgb
from finetune.tiny.vocab import build_tokenizer

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def make_image(path: Path, color=RED, size=(32, 32), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def stripes(width: int = 96, height: int = 32, colors=(RED, GREEN, BLUE)) -> Image.Image:
    """Vertical bands of `colors`, left to right."""
    image = Image.new("RGB", (width, height))
    band = width // len(colors)
    for i, color in enumerate(colors):
        image.paste(color, (i * band, 0, (i + 1) * band, height))
    return image


def data_cfg(**overrides) -> DataConfig:
    defaults = dict(resolution=32, batch_size=2, random_flip=False, shuffle=False)
    return DataConfig(**{**defaults, **overrides})


def captions_by_key(cfg: DataConfig) -> dict[str, str]:
    return {record.key: record.caption for record in find_records(cfg).records}


def mean_rgb(pixels: torch.Tensor) -> list[float]:
    return pixels.mean(dim=(1, 2)).tolist()


# --- sources ---------------------------------------------------------------------------------------


def test_sidecar_folder_is_searched_recursively(tmp_path, caplog):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    make_image(tmp_path / "sub" / "b.JPG")
    (tmp_path / "sub" / "b.txt").write_text("a blue one")
    make_image(tmp_path / "sub" / "deeper" / "c.webp")  # no caption file
    make_image(tmp_path / ".hidden" / "d.png")
    (tmp_path / "notes.md").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        found = captions_by_key(data_cfg(path=str(tmp_path)))
    assert found == {"a.png": "a red square", "sub/b.JPG": "a blue one", "sub/deeper/c.webp": ""}
    warnings = [r.getMessage() for r in caplog.records if "no caption" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("1 of 3 images")


def test_metadata_jsonl(tmp_path, caplog):
    make_image(tmp_path / "images" / "x.png")
    make_image(tmp_path / "y.jpg")
    make_image(tmp_path / "unlisted.png")
    rows = [{"file_name": "images/x.png", "text": "first"}, {"file_name": "y.jpg", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    (tmp_path / "y.txt").write_text("sidecars are ignored when metadata exists")
    with caplog.at_level(logging.WARNING):
        assert captions_by_key(data_cfg(path=str(tmp_path))) == {"images/x.png": "first", "y.jpg": "second"}
    assert "1 images under" in caplog.text and "not listed in metadata.jsonl" in caplog.text


def test_metadata_csv_with_custom_columns(tmp_path):
    make_image(tmp_path / "x.png")
    make_image(tmp_path / "y.webp")
    (tmp_path / "metadata.csv").write_text(
        'path,caption\nx.png,"a cat, sitting"\ny.webp,\n', encoding="utf-8-sig"
    )
    cfg = data_cfg(path=str(tmp_path), file_column="path", caption_column="caption")
    assert captions_by_key(cfg) == {"x.png": "a cat, sitting", "y.webp": ""}


def test_metadata_paths_outside_the_root_are_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "root"
    make_image(root / "ok.png")
    outside = make_image(tmp_path / "secret.png")
    rows = [
        {"file_name": "ok.png", "text": "fine"},
        {"file_name": "../secret.png", "text": "escape"},
        {"file_name": str(outside), "text": "absolute"},
        {"file_name": "missing.png", "text": "gone"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n{broken\n")
    with caplog.at_level(logging.WARNING):
        result = find_records(data_cfg(path=str(root)))
    assert [record.key for record in result.records] == ["ok.png"]
    reasons = {skip.key.split(" ")[0]: skip.reason for skip in result.skipped}
    assert "escapes the dataset root" in reasons["../secret.png"]
    assert "absolute path" in reasons[str(outside)]
    assert "not found" in reasons["missing.png"]
    assert "invalid JSON" in reasons["metadata.jsonl"]
    assert "../secret.png" in caplog.text and str(outside) in caplog.text


def _hf_dataset(tmp_path: Path, n: int = 3) -> datasets.Dataset:
    images = [make_image(tmp_path / "src" / f"{i}.png", color=(80 * i, 0, 0)) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [str(p) for p in images], "text": [f"caption {i}" for i in range(n)]}, features=features
    )


def test_hf_saved_dataset_and_dataset_dict(tmp_path, tokenizer):
    dataset = _hf_dataset(tmp_path)
    dataset.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": dataset.select([0]), "val": dataset}).save_to_disk(str(tmp_path / "dict"))

    single = find_records(data_cfg(source="hf", name=str(tmp_path / "single"))).records
    assert [r.caption for r in single] == ["caption 0", "caption 1", "caption 2"]
    assert single[2].load().getpixel((0, 0)) == (160, 0, 0)
    split = find_records(data_cfg(source="hf", name=str(tmp_path / "dict"), split="val")).records
    assert len(split) == 3

    # Records travel to a worker process by pickling: the whole path must survive it.
    cfg = data_cfg(source="hf", name=str(tmp_path / "dict"), split="train", num_workers=1)
    batch = next(iter(CaptionedImageDataModule(cfg, tokenizer).train_dataloader()))
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_hf_column_of_relative_paths_stays_inside_the_dataset_folder(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "files" / "a.png")
    make_image(tmp_path / "outside.png")
    dataset = datasets.Dataset.from_dict({"file": ["files/a.png", "../outside.png"], "text": ["a", "b"]})
    dataset.save_to_disk(str(root))
    result = find_records(data_cfg(source="hf", name=str(root), image_column="file"))
    assert [r.caption for r in result.records] == ["a"]
    assert "escapes the dataset root" in result.skipped[0].reason


# --- one-line errors -------------------------------------------------------------------------------


def _error(cfg) -> str:
    with pytest.raises(FinetuneError) as info:  # a DataError, or a ConfigError for a bad value
        CaptionedImageDataModule(cfg).scan()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_folder_errors_are_one_line_and_name_the_key(tmp_path):
    assert "data.path is not set" in _error(data_cfg(path=None))
    missing = OmegaConf.merge(OmegaConf.structured(DataConfig), {"path": "???"})
    assert "data.path is not set" in _error(missing)
    assert "data.path: 'nowhere/at/all' does not exist" in _error(data_cfg(path="nowhere/at/all"))
    empty = _error(data_cfg(path=str(tmp_path)))
    assert "no usable images" in empty and ".png" in empty and ".txt" in empty and "metadata.jsonl" in empty
    assert "data.source: Invalid value 'ftp', expected one of [folder, hf]" in _error(
        data_cfg(source="ftp", path=str(tmp_path))
    )

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    message = _error(data_cfg(path=str(tmp_path)))
    assert "data.caption_column: 'text'" in message and "available columns: caption, file_name" in message
    message = _error(data_cfg(path=str(tmp_path), file_column="image", caption_column="caption"))
    assert "data.file_column: 'image'" in message


def test_hf_errors_are_one_line_and_name_the_key(tmp_path):
    _hf_dataset(tmp_path).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": _hf_dataset(tmp_path)}).save_to_disk(str(tmp_path / "dict"))
    name = str(tmp_path / "saved")
    assert "data.name is not set" in _error(data_cfg(source="hf"))
    assert "data.name: cannot load 'someone/nothing'" in _error(data_cfg(source="hf", name="someone/nothing"))
    message = _error(data_cfg(source="hf", name=name, image_column="img"))
    assert "data.image_column: 'img'" in message and "available columns: image, text" in message
    assert "data.caption_column: 'caption'" in _error(
        data_cfg(source="hf", name=name, caption_column="caption")
    )
    message = _error(data_cfg(source="hf", name=str(tmp_path / "dict"), split="test"))
    assert "data.split: 'test'" in message and "available splits: train" in message


# --- decoding --------------------------------------------------------------------------------------


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = open_image(_save(image, tmp_path / "rgba.png"))
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == RED


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "1", "I;16"])
def test_every_mode_becomes_rgb(mode):
    assert to_rgb(Image.new(mode, (4, 4))).mode == "RGB"


def test_sixteen_bit_grey_keeps_its_brightness():
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert 120 < to_rgb(grey).getpixel((0, 0))[0] < 135


def test_exif_orientation_is_applied(tmp_path):
    # Stored sideways (left red, right blue) with "rotate 90° clockwise to display": upright is red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stripes(40, 20, (RED, BLUE)), tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = open_image(path)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_undecodable_file_raises_a_data_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not really a png")
    with pytest.raises(ImageDecodeError, match="bad.png"):
        open_image(tmp_path / "bad.png")


# --- dataset and batches ---------------------------------------------------------------------------


def test_batches_have_the_documented_shapes_dtypes_and_range(tmp_path, tokenizer):
    for i in range(3):
        _save(stripes(48 + 16 * i, 32), tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a red circle")
    untokenized = CaptionedImageDataModule(data_cfg(path=str(tmp_path), random_flip=True, crop="random"))
    assert untokenized.scan() == 3 and untokenized.num_images == 3
    with pytest.raises(DataError, match="tokenizer"):
        untokenized.setup("fit")
    module = CaptionedImageDataModule(untokenized.cfg, tokenizer, scan=untokenized.data)
    batches = list(module.train_dataloader())
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 1]  # drop_last=False
    pixels, ids = batches[0]["pixel_values"], batches[0]["input_ids"]
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.min() < -0.9 and pixels.max() > 0.9
    assert ids.shape == (2, tokenizer.model_max_length) and ids.dtype == torch.int64
    assert ids[0].tolist() == tokenizer("a red circle", padding="max_length", max_length=77).input_ids


def _dataset(tmp_path: Path, image: Image.Image, tokenizer, **overrides):
    _save(image, tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("a green square")
    module = CaptionedImageDataModule(data_cfg(path=str(tmp_path), **overrides), tokenizer)
    module.setup("fit")
    return module.dataset


def test_center_crop_keeps_the_middle_of_a_wide_image(tmp_path, tokenizer):
    red, green, blue = mean_rgb(_dataset(tmp_path, stripes(96, 32), tokenizer)[0]["pixel_values"])
    assert green > 0.9 and red < -0.9 and blue < -0.9


def test_random_flip_flips_sometimes_and_only_when_asked(tmp_path, tokenizer):
    image = stripes(32, 32, (RED, BLUE))
    flipped = _dataset(tmp_path / "on", image, tokenizer, random_flip=True)
    left_is_red = [bool(flipped[(0, seed)]["pixel_values"][0, :, :8].mean() > 0) for seed in range(20)]
    assert set(left_is_red) == {True, False}
    # The sample's seed decides, not the worker or the global RNG: the same seed flips the same way.
    assert left_is_red == [
        bool(flipped[(0, seed)]["pixel_values"][0, :, :8].mean() > 0) for seed in range(20)
    ]
    plain = _dataset(tmp_path / "off", image, tokenizer, random_flip=False)
    assert all(plain[(0, seed)]["pixel_values"][0, :, :8].mean() > 0 for seed in range(5))


def test_caption_dropout_gives_the_empty_caption(tmp_path, tokenizer):
    dataset = _dataset(tmp_path, stripes(), tokenizer, caption_dropout=1.0)
    assert torch.equal(dataset[0]["input_ids"], dataset.tokenize("")["input_ids"])
    assert not torch.equal(dataset.tokenize("a green square")["input_ids"], dataset.tokenize("")["input_ids"])


def test_file_cut_after_the_scan_is_replaced_at_training_time_not_fatal(tmp_path, tokenizer, caplog):
    make_image(tmp_path / "a.png", GREEN)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    noisy.save(tmp_path / "b.png")
    make_image(tmp_path / "c.png", GREEN)
    module = CaptionedImageDataModule(data_cfg(path=str(tmp_path), batch_size=3), tokenizer)
    assert module.scan() == 3
    (tmp_path / "b.png").write_bytes((tmp_path / "b.png").read_bytes()[:200])  # cut after the scan
    with caplog.at_level(logging.WARNING):
        (batch,) = list(module.train_dataloader())
    assert batch["pixel_values"].shape[0] == 3
    assert all(mean_rgb(pixels)[1] > 0.9 for pixels in batch["pixel_values"])
    assert "b.png" in caplog.text
