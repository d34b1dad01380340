"""Loss masks (data.masks): read from the alpha channel or a folder, placed exactly like their images
(crop box, flip, bucket resize), cached with them, and refused in one line when misconfigured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.config.errors import ConfigError
from finetune.config.schema import DataConfig, ModelConfig
from finetune.data import CaptionedImageDataModule
from finetune.data.buckets import fit_to
from finetune.data.cache import CacheStore, plan_cache
from finetune.data.dataset import TO_TENSOR
from finetune.data.masks import LossMasks, to_latent_grid
from finetune.data.scan import check_data_config
from finetune.data.source_settings import SourceStyle
from finetune.models.loading import load_components

SHAPE = (6, 4, 30, 22)  # left, top, right, bottom: off-centre, so a flip or a shifted crop shows


@pytest.fixture(scope="module")
def parts(tiny_model):
    return load_components(ModelConfig(pretrained=str(tiny_model), resolution=32))


def cutout(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    """A red rectangle, opaque, on a transparent background: composited on white, a pixel's green
    value is 1 minus its alpha, so an aligned mask equals 1 - green everywhere, edges included."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), SHAPE)
    image.save(path)
    path.with_suffix(".txt").write_text("a red box")
    return path


def folder_pair(root: Path, masks: Path, size: tuple[int, int] = (64, 48)) -> None:
    """The same picture as `cutout`, as an opaque RGB image plus a greyscale mask file."""
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((255, 0, 0), SHAPE)
    image.save(root / "box.png")
    (root / "box.txt").write_text("a red box")
    mask = Image.new("L", size, 0)
    mask.paste(255, SHAPE)
    mask.save(masks / "box.png")


def datamodule(root: Path, tokenizer, **overrides) -> CaptionedImageDataModule:
    settings = dict(path=str(root), resolution=32, masks="alpha", shuffle=False, crop="random")
    data = CaptionedImageDataModule(DataConfig(**{**settings, **overrides}), tokenizer, seed=0)
    data.scan()
    return data


def green(sample: dict[str, torch.Tensor]) -> torch.Tensor:
    return (sample["pixel_values"][1] + 1) / 2


@pytest.mark.parametrize("buckets", [False, True], ids=["square-crop", "bucket"])
@pytest.mark.parametrize("source", ["alpha", "folder"])
def test_the_mask_follows_its_image_through_crop_flip_and_resize(tmp_path, parts, buckets, source):
    root, masks = tmp_path / "data", tmp_path / "masks"
    root.mkdir()
    masks.mkdir()
    if source == "alpha":
        cutout(root / "box.png")
    else:
        folder_pair(root, masks)
    data = datamodule(
        root,
        parts.tokenizer,
        buckets=buckets,
        bucket_step=8,
        masks=str(masks) if source == "folder" else "alpha",
    )
    data.setup("fit")
    placements = set()
    for seed in range(12):
        sample = data.dataset[(0, seed)]
        mask = sample["loss_mask"]
        assert mask.shape == (1, *sample["pixel_values"].shape[1:]) and mask.dtype == torch.float32
        assert mask.min() == 0 and mask.max() == 1  # the shape and the background are both in view
        torch.testing.assert_close(mask[0], 1 - green(sample), atol=2 / 255, rtol=0)
        columns = mask[0].sum(0)
        centre = float((columns * torch.arange(len(columns))).sum() / columns.sum())
        flipped = centre > len(columns) / 2  # the box is on the left, unflipped
        placements.add((tuple(sample["crop_top_left"].tolist()), flipped))
    assert {flipped for _, flipped in placements} == {False, True}
    assert len({crop for crop, _ in placements}) > 2  # several crop boxes were drawn


def test_images_without_alpha_train_whole_and_are_counted_in_a_note(tmp_path, parts):
    root = tmp_path / "data"
    root.mkdir()
    cutout(root / "cut.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(root / "plain.jpg")
    data = datamodule(root, parts.tokenizer, random_flip=False)
    data.setup("fit")
    keys = [record.key for record in data.records]
    assert torch.equal(data.dataset[keys.index("plain.jpg")]["loss_mask"], torch.ones(1, 32, 32))
    assert data.dataset[keys.index("cut.png")]["loss_mask"].min() == 0
    notes = [note for note in data.scan_result.notes if "alpha" in note]
    assert notes == [
        "data.masks=alpha: 1 of 2 images have no alpha channel and train on the whole image (plain.jpg)"
    ]


def test_a_missing_mask_file_skips_its_image_and_another_size_is_resized(tmp_path, parts):
    root, masks = tmp_path / "data", tmp_path / "masks"
    root.mkdir()
    masks.mkdir()
    folder_pair(root, masks)
    Image.new("RGB", (32, 32)).save(root / "lonely.png")
    (masks / "box.png").unlink()
    big = Image.new("L", (128, 96), 0)
    big.paste(255, tuple(2 * side for side in SHAPE))
    big.save(masks / "box.webp", lossless=True)  # twice the image's size, another extension
    data = datamodule(root, parts.tokenizer, masks=str(masks))
    result = data.scan_result
    assert [record.key for record in data.records] == ["box.png"]
    assert [(s.key, s.reason) for s in result.skipped] == [
        ("lonely.png", f"no mask image lonely.* in {masks} (data.masks)")
    ]
    assert [(f.key, f.what) for f in result.fixed] == [
        ("box.png", "mask is 128 x 96: resized to the image's 64 x 48")
    ]
    image, mask = LossMasks(alpha=False).load(data.records[0])
    assert mask.size == image.size == (64, 48)
    assert mask.getpixel((SHAPE[0] + 2, SHAPE[1] + 2)) == 255 and mask.getpixel((SHAPE[2] + 2, 0)) == 0


def test_cached_samples_carry_the_uncached_mask_on_the_latent_grid(tmp_path, parts):
    root = tmp_path / "data"
    root.mkdir()
    cutout(root / "box.png")
    plain = datamodule(root, parts.tokenizer, crop="center")
    plain.setup("fit")
    cached = datamodule(root, parts.tokenizer, crop="center", cache="memory")
    cache = cached.prepare_cache(parts.vae, parts.prompts)
    flips = set()
    for seed in range(6):
        expected, got = plain.dataset[(0, seed)], cached.dataset[(0, seed)]
        grid = got["latent_dist"].shape[-2:]
        assert got["loss_mask"].shape == (1, *grid) and grid != expected["loss_mask"].shape[-2:]
        torch.testing.assert_close(got["loss_mask"], to_latent_grid(expected["loss_mask"][None], grid)[0])
        flips.add(bool(torch.equal(got["latent_dist"], cache.latent(0, True))))
    assert flips == {False, True}


def test_a_cached_random_crop_places_mask_and_latents_with_the_same_box_and_flip(tmp_path, parts):
    root = tmp_path / "data"
    root.mkdir()
    cutout(root / "box.png")
    cached = datamodule(root, parts.tokenizer, cache="memory")
    cache = cached.prepare_cache(parts.vae, parts.prompts)
    image = cached.records[0].load()
    crop = cache.latents[0].crop_top_left
    assert crop != (0, 5)  # drawn, not the centre crop of the 43 x 32 resize
    for flip in (False, True):
        stored = cache.entry(0, flip)
        pixels = TO_TENSOR(fit_to(image, cached.sizes[0], crop, flip).image)
        with torch.no_grad():
            encoded = parts.vae.encode(pixels[None]).latent_dist.parameters[0]
        torch.testing.assert_close(stored["latent_dist"], encoded, atol=1e-5, rtol=0)
        expected = to_latent_grid(((1 - pixels[1:2]) / 2)[None], encoded.shape[-2:])[0]  # 1 - green
        torch.testing.assert_close(stored["loss_mask"], expected, atol=2 / 255, rtol=0)


def _keys(root: Path, **masks) -> dict[bool, str]:
    data = DataConfig(path=str(root), resolution=32, **masks)
    scanned = CaptionedImageDataModule(data, None, seed=0)
    cache = plan_cache(
        scanned.records,
        scanned.sizes,
        CacheStore("memory"),
        styles=[SourceStyle(random_flip=True)],
        seed=0,
        vae="vae",
        vae_dtype=torch.float32,
        text_encoder=None,
        masks=LossMasks.from_config(data),
    )
    return cache.latents[0].keys


def test_the_cache_key_changes_with_masks_on_off_their_source_and_the_mask_file(tmp_path):
    root, masks = tmp_path / "data", tmp_path / "masks"
    root.mkdir()
    masks.mkdir()
    folder_pair(root, masks)
    off, alpha, folder = _keys(root), _keys(root, masks="alpha"), _keys(root, masks=str(masks))
    assert len({off[False], alpha[False], folder[False]}) == 3
    mask = Image.open(masks / "box.png")
    mask.paste(128, (0, 0, 4, 4))
    mask.save(masks / "box.png")
    assert _keys(root, masks=str(masks))[False] != folder[False]  # an edited mask is never read stale


def test_a_cache_filled_without_masks_is_not_reused_with_them(tmp_path, parts):
    root = tmp_path / "data"
    root.mkdir()
    cutout(root / "box.png")
    settings = dict(cache="disk", cache_dir=str(tmp_path / "cache"), crop="center")
    first = datamodule(root, parts.tokenizer, masks=None, **settings).prepare_cache(parts.vae, parts.prompts)
    assert "loss_mask" not in first.entry(0, False)
    again = datamodule(root, parts.tokenizer, **settings).prepare_cache(parts.vae, parts.prompts)
    assert again.computed == 2 and again.reused == 1  # both orientations again; the caption is reused
    assert all("loss_mask" in again.entry(0, flip) for flip in (False, True))


def _error(**settings) -> str:
    with pytest.raises(ConfigError) as raised:
        check_data_config(DataConfig(**settings))
    return str(raised.value)


def test_masks_that_cannot_work_are_one_line_naming_the_key(tmp_path):
    missing = tmp_path / "nowhere"
    assert _error(path=str(tmp_path), masks=str(missing)).startswith(
        f"data.masks: '{missing}' does not exist"
    )
    (tmp_path / "file.png").write_bytes(b"")
    assert _error(masks=str(tmp_path / "file.png")).startswith("data.masks:")
    assert _error(source="hf", name="x", masks=str(tmp_path)).startswith("data.masks: a folder of masks")
    assert _error(source="hf", name="x", streaming=True, masks="alpha").startswith(
        "data.masks: not available"
    )
    for message in (_error(masks=str(missing)), _error(source="hf", name="x", masks=str(tmp_path))):
        assert "\n" not in message
    check_data_config(DataConfig(masks="alpha"))  # the good values pass
    check_data_config(DataConfig(masks=str(tmp_path)))


@pytest.mark.parametrize("key", ["masks", "conditioning_path"])
def test_a_mask_or_conditioning_folder_inside_the_data_folder_is_no_training_data(tmp_path, key):
    from finetune.data.sources import find_records

    root = tmp_path / "data"
    companion = root / "companion"
    companion.mkdir(parents=True)
    folder_pair(root, companion)  # data/box.png, data/box.txt, data/companion/box.png
    found = find_records(DataConfig(path=str(root), resolution=32, **{key: str(companion)}))
    assert [record.key for record in found.records] == ["box.png"]
    assert found.skipped == []  # not "no mask image companion/box.*" nor "no caption"
