"""Cached ControlNet pairs stay whole: a record that fails to decode is replaced by a whole other pair,
and a pair that is broken before the cache pre-pass is a skip with its reason."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config.schema import DataConfig, ModelConfig
from finetune.data import CaptionedImageDataModule
from finetune.data.images import FileImage
from finetune.models.loading import load_components

SEEDS = range(6)


@pytest.fixture(scope="module")
def parts(tiny_model):
    return load_components(ModelConfig(pretrained=str(tiny_model), resolution=32))


def _pairs(root: Path) -> Path:
    """Three pairs that tell each other apart: other widths (so other centre crops), colours and edges.

    Each conditioning image (conditions/<name>) is its image at half size, so pairs line up.
    """
    (root / "images").mkdir(parents=True)
    (root / "conditions").mkdir()
    for i, width in enumerate((64, 56, 48)):
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(32, 0)
        y = np.linspace(0, 255, 32, dtype=np.float32)[:, None].repeat(width, 1)
        pixels = np.stack([x, y, np.full_like(x, 40 + 80 * i)], -1).astype(np.uint8)
        pixels[:, 10 + 6 * i : 16 + 6 * i] = 255  # a white bar: edges for canny, asymmetric under flips
        image = Image.fromarray(pixels)
        image.save(root / "images" / f"{i}.png")
        image.resize((width // 2, 16), Image.BICUBIC).save(root / "conditions" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(f"pair number {i}")
    return root


def _module(root: Path, parts, conditioning: str, **overrides) -> CaptionedImageDataModule:
    """`conditioning`: "canny" (computed from the image) or "read" (from conditions/)."""
    control = (
        {"conditioning": "canny"}
        if conditioning == "canny"
        else {"conditioning_path": str(root / "conditions")}
    )
    settings = dict(path=str(root / "images"), resolution=32, batch_size=1, shuffle=False, random_flip=True)
    module = CaptionedImageDataModule(DataConfig(**settings, **control, **overrides), parts.tokenizer, seed=0)
    assert module.scan() == 3
    return module


def _break(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels do not


def _plain_samples(module: CaptionedImageDataModule) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Every record's uncached sample for each seed: pixels and conditioning made on the fly."""
    module.setup("fit")
    return {(index, seed): module.dataset[(index, seed)] for index in range(3) for seed in SEEDS}


def _assert_whole_pair(served: dict, index: int, plain: dict, cache, parts) -> bool:
    """`served` is record `index`'s own sample in every part; returns whether it is flipped."""
    entry = cache.latents[index]
    assert served["index"].item() == index
    assert served["crop_top_left"].tolist() == list(entry.crop_top_left) == plain["crop_top_left"].tolist()
    assert served["original_size"].tolist() == plain["original_size"].tolist()
    flipped = torch.equal(served["latent_dist"], cache.latent(index, True))
    assert flipped or torch.equal(served["latent_dist"], cache.latent(index, False))
    with torch.no_grad():  # the cached latent is of the very pixels the conditioning was placed on
        encoded = parts.vae.encode(plain["pixel_values"][None]).latent_dist.parameters[0]
    assert torch.allclose(served["latent_dist"], encoded, atol=1e-5)
    assert torch.equal(served["conditioning_pixel_values"], plain["conditioning_pixel_values"])
    assert torch.equal(served["text_embeds"], cache.text(f"pair number {index}")["text_embeds"])
    return flipped


def _assert_pairs_differ(plain: dict) -> None:
    """The check above could not tell records 1 and 2 apart otherwise."""
    one, two = plain[(1, 0)], plain[(2, 0)]
    assert not torch.equal(one["conditioning_pixel_values"], two["conditioning_pixel_values"])
    assert one["crop_top_left"].tolist() != two["crop_top_left"].tolist()


def test_a_cached_pair_whose_image_breaks_is_replaced_by_a_whole_other_pair(tmp_path, parts, caplog):
    root = _pairs(tmp_path)
    plain = _plain_samples(_module(root, parts, "canny"))
    _assert_pairs_differ(plain)
    cached = _module(root, parts, "canny", cache="memory")
    cache = cached.prepare_cache(parts.vae, parts.prompts)
    _break(root / "images" / "1.png")  # after the pre-pass: canny needs the image at training time
    with caplog.at_level(logging.WARNING):
        flips = {
            _assert_whole_pair(cached.dataset[(1, seed)], 2, plain[(2, seed)], cache, parts) for seed in SEEDS
        }
    assert flips == {True, False}  # the substitute's latent, crop and edges agree on the flip as well
    assert str(root / "images" / "1.png") in caplog.text


def test_a_conditioning_image_broken_before_caching_is_a_skip_with_its_reason(tmp_path, parts, caplog):
    root = _pairs(tmp_path)
    module = _module(root, parts, "read", cache="memory")
    _break(root / "conditions" / "1.png")  # after the scan, which reads headers only
    with caplog.at_level(logging.WARNING):
        module.prepare_cache(parts.vae, parts.prompts)
    assert [record.key for record in module.records] == ["0.png", "2.png"]
    skipped = module.scan_result.skipped[-1]
    assert skipped.key == "1.png"
    assert (
        skipped.reason.startswith("conditioning image: ")
        and str(root / "conditions" / "1.png") in skipped.reason
    )
    assert "1.png while caching" in caplog.text
    seen = [index for batch in module.train_dataloader() for index in batch["index"].tolist()]
    assert sorted(seen) == [0, 1]  # both pairs left train, nothing crashes


def test_a_cached_read_pair_broken_after_caching_is_replaced_whole(tmp_path, parts, caplog):
    root = _pairs(tmp_path)
    plain = _plain_samples(_module(root, parts, "read"))
    _assert_pairs_differ(plain)
    cached = _module(root, parts, "read", cache="memory")
    cache = cached.prepare_cache(parts.vae, parts.prompts)
    _break(root / "conditions" / "1.png")
    _break(root / "images" / "0.png")  # its latents are cached: a read pair needs no target pixels
    with caplog.at_level(logging.WARNING):
        for seed in SEEDS:
            _assert_whole_pair(cached.dataset[(1, seed)], 2, plain[(2, seed)], cache, parts)
            _assert_whole_pair(cached.dataset[(0, seed)], 0, plain[(0, seed)], cache, parts)
    assert str(root / "conditions" / "1.png") in caplog.text and "0.png" not in caplog.text


@pytest.mark.parametrize("broken", ["images", "conditions"])
def test_an_uncached_pair_that_breaks_is_replaced_whole(tmp_path, parts, broken):
    root = _pairs(tmp_path)
    module = _module(root, parts, "read")
    plain = _plain_samples(module)
    _break(root / broken / "1.png")
    for seed in SEEDS:
        served, expected = module.dataset[(1, seed)], plain[(2, seed)]
        assert served.keys() == expected.keys()
        for name in served:
            assert torch.equal(served[name], expected[name]), name


def test_the_pre_pass_decodes_each_pair_once(tmp_path, parts, monkeypatch):
    root = _pairs(tmp_path)
    module = _module(root, parts, "read", cache="memory")
    decoded: list[str] = []
    original = FileImage.__call__
    monkeypatch.setattr(
        FileImage, "__call__", lambda self: decoded.append(self.path.parent.name) or original(self)
    )
    cache = module.prepare_cache(parts.vae, parts.prompts)
    assert cache.computed == 3 * 2 + 3  # both orientations of each image, and each caption
    assert sorted(decoded) == ["conditions"] * 3 + ["images"] * 3  # both orientations from one decode
