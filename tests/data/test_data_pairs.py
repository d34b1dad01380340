"""ControlNet pairs: a conditioning image gets its target's crop and flip; misaligned pairs are skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config.errors import ConfigError
from finetune.config.schema import DataConfig
from finetune.data import CaptionedImageDataModule, find_records
from finetune.tiny.vocab import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def gradient(width: int, height: int) -> Image.Image:
    """Every pixel different: red rises left to right, green top to bottom."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 90)], -1).astype(np.uint8))


def _pairs(tmp_path, layout: str) -> dict:
    """Three images with conditioning images of half the size; the third pair has another shape.

    parallel_folder: conditions/<name>.png beside images/; metadata: a `conditioning` column.
    """
    images = tmp_path / "images"
    conditions = tmp_path / "conditions" if layout == "parallel_folder" else images
    images.mkdir()
    conditions.mkdir(exist_ok=True)
    rows = []
    for i in range(3):
        gradient(96, 48).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"pair {i}")
        name = f"{i}.png" if layout == "parallel_folder" else f"c{i}.png"
        (gradient(48, 24) if i < 2 else gradient(40, 40)).save(conditions / name)
        rows.append({"file_name": f"{i}.png", "text": f"pair {i}", "conditioning": name})
    if layout == "metadata":
        (images / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
        return dict(path=str(images), conditioning_column="conditioning")
    return dict(path=str(images), conditioning_path=str(conditions))


@pytest.mark.parametrize("layout", ["parallel_folder", "metadata"])
def test_conditioning_gets_the_same_crop_and_flip_as_its_image(tmp_path, tokenizer, layout):
    settings = _pairs(tmp_path, layout)
    cfg = DataConfig(**settings, resolution=32, crop="random", random_flip=True, batch_size=1)
    module = CaptionedImageDataModule(cfg, tokenizer, seed=0)
    assert module.scan() == 2
    assert [s.reason for s in module.scan_result.skipped] == [
        "conditioning image is 40 x 40, another shape than the image (96 x 48)"
    ]
    module.setup("fit")
    crops, flips = set(), set()
    for seed in range(12):
        sample = module.dataset[(0, seed)]
        image = (sample["pixel_values"] + 1) / 2  # back to [0, 1]
        condition = sample["conditioning_pixel_values"]
        assert condition.shape == image.shape == (3, 32, 32)
        assert condition.min() >= 0 and condition.max() <= 1
        # Both are the same gradient: aligned pairs agree pixel for pixel (up to resampling).
        assert torch.allclose(condition, image, atol=0.04)
        crops.add(tuple(sample["crop_top_left"].tolist()))
        flips.add(bool(image[0, 0, 0] > image[0, 0, -1]))  # red falls left to right: flipped
    assert len(crops) > 1 and flips == {True, False}  # the test saw random crops and both flips


def test_missing_conditioning_files_are_skipped_with_the_reason(tmp_path):
    settings = _pairs(tmp_path, "parallel_folder")
    (tmp_path / "conditions" / "1.png").unlink()
    result = find_records(DataConfig(**settings, resolution=32))
    assert [r.key for r in result.records] == ["0.png"]
    reasons = {s.key: s.reason for s in result.skipped}
    assert reasons["1.png"].startswith("no conditioning image 1.*")
    assert "another shape" in reasons["2.png"]


def test_canny_preprocessor_gives_edges_of_the_fitted_image(tmp_path, tokenizer):
    root = tmp_path / "images"
    root.mkdir()
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (32, 0, 64, 32))  # one vertical edge, at x=32
    image.save(root / "a.png")
    (root / "a.txt").write_text("an edge")
    cfg = DataConfig(path=str(root), resolution=32, random_flip=False, conditioning="canny", batch_size=1)
    module = CaptionedImageDataModule(cfg, tokenizer, seed=0)
    module.setup("fit")
    edges = module.dataset[(0, 0)]["conditioning_pixel_values"]
    columns = edges[0].amax(dim=0)
    # A 64x32 image already covers 32x32; the centre crop takes x 16..48, so the edge is at column 16.
    assert columns[15:17].max() == 1.0
    assert columns[:14].max() == 0.0 and columns[18:].max() == 0.0
    with pytest.raises(ConfigError, match="unknown preprocessor 'depthh'"):
        CaptionedImageDataModule(
            DataConfig(path=str(root), resolution=32, conditioning="depthh"), tokenizer
        ).setup()


def test_fill50k_layout_hf_dataset_with_a_conditioning_column(tmp_path, tokenizer):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
    )
    rows = {
        "image": [gradient(64, 32), gradient(64, 32)],
        "conditioning_image": [gradient(64, 32), Image.new("RGB", (10, 40))],  # the second is misaligned
        "text": ["a pair", "another"],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "fill"))
    cfg = DataConfig(
        source="hf", name=str(tmp_path / "fill"), conditioning_column="conditioning_image", resolution=32
    )
    module = CaptionedImageDataModule(cfg, tokenizer, seed=0)
    assert module.scan() == 1
    assert "another shape" in module.scan_result.skipped[0].reason
    module.setup("fit")
    sample = module.dataset[(0, 3)]
    assert torch.allclose(sample["conditioning_pixel_values"], (sample["pixel_values"] + 1) / 2, atol=0.04)
