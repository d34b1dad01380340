"""Each kind of bad input is fixed (and noted) or skipped with its reason: never a crash, never silent."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from finetune.config.schema import DataConfig
from finetune.data import find_records
from finetune.data.images import open_image
from finetune.data.masks import split_alpha


def cfg(path, **overrides) -> DataConfig:
    return DataConfig(**{"path": str(path), "resolution": 32, "missing_caption": "empty", **overrides})


def outcome(tmp_path, name: str, **overrides) -> tuple[str, str]:
    """('kept' | 'fixed' | 'skipped', what was said) for the file `name` in `tmp_path`."""
    result = find_records(cfg(tmp_path, **overrides))
    skipped = {s.key: s.reason for s in result.skipped}
    fixed = {f.key: f.what for f in result.fixed}
    kept = {r.key for r in result.records}
    if name in skipped:
        assert name not in kept
        return "skipped", skipped[name]
    assert name in kept, f"{name} was neither kept nor skipped"
    return ("fixed", fixed[name]) if name in fixed else ("kept", "")


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "good.png")  # so the dataset is never empty
    return tmp_path


def test_zero_byte_file_is_skipped(folder):
    (folder / "empty.png").write_bytes(b"")
    kind, reason = outcome(folder, "empty.png")
    assert kind == "skipped" and "not a readable image" in reason


def test_non_image_file_with_an_image_extension_is_skipped(folder):
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    kind, reason = outcome(folder, "notes.jpg")
    assert kind == "skipped" and "not a readable image" in reason


def test_truncated_file_is_skipped_when_verified(folder, caplog):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    kind, reason = outcome(folder, "cut.png", verify=True)
    assert kind == "skipped" and "cannot decode" in reason
    with caplog.at_level(logging.WARNING):
        find_records(cfg(folder, verify=True))
    assert "cut.png" in caplog.text  # reported, not dropped silently


def _encoded(fmt: str) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "cut.png"), ("JPEG", "cut.jpg"), ("WEBP", "cut.webp")])
def test_a_file_cut_short_is_skipped_at_scan_time_without_verify(folder, fmt, name):
    data = _encoded(fmt)
    (folder / name).write_bytes(data[: len(data) * 2 // 3])
    kind, reason = outcome(folder, name)
    assert kind == "skipped" and reason.startswith("file is cut short")
    expected = {"PNG": "(IEND)", "JPEG": "(FF D9)", "WEBP": f"the file has {len(data) * 2 // 3:,}"}[fmt]
    assert expected in reason


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "ok.png"), ("JPEG", "ok.jpg"), ("WEBP", "ok.webp")])
def test_whole_files_pass_the_end_check_with_padding_or_extra_bytes(folder, fmt, name):
    (folder / name).write_bytes(_encoded(fmt))
    assert outcome(folder, name) == ("kept", "")
    (folder / name).write_bytes(_encoded(fmt) + b"\x00" * 100)  # padding to a block size
    assert outcome(folder, name) == ("kept", "")
    # Data after the end that is not padding (a phone's motion-photo video after a JPEG) costs a
    # decode to tell it from a cut file, and the file is kept.
    (folder / name).write_bytes(_encoded(fmt) + b"ftypmp42" * 64)
    assert outcome(folder, name) == ("kept", "")


def test_cut_dataset_rows_are_skipped_at_scan_time(tmp_path):
    import datasets

    whole, cut = _encoded("JPEG"), _encoded("PNG")[:-200]
    rows = {"image": [{"bytes": whole, "path": None}, {"bytes": cut, "path": None}], "text": ["a", "b"]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "rows"))
    result = find_records(DataConfig(source="hf", name=str(tmp_path / "rows"), resolution=32))
    assert [r.key.rsplit("#")[-1] for r in result.records] == ["0"]
    assert [(s.key.rsplit("#")[-1], s.reason.split(":")[0]) for s in result.skipped] == [
        ("1", "file is cut short")
    ]


@pytest.mark.parametrize(
    ("mode", "colour", "expected_note", "expected_rgb"),
    [
        ("CMYK", (0, 255, 255, 0), "CMYK converted", (255, 0, 0)),
        ("L", 128, "greyscale converted", (128, 128, 128)),
        ("P", None, "palette image converted", (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), "transparency composited on white", (255, 255, 255)),
        ("I;16", 65535, "16-bit image scaled", (255, 255, 255)),
    ],
)
def test_unusual_modes_are_converted_and_noted(folder, mode, colour, expected_note, expected_rgb):
    if mode == "P":
        image = Image.new("RGB", (32, 32), (255, 0, 0)).convert("P")
    else:
        image = Image.new(mode, (32, 32), colour)
    image.save(folder / "odd.png" if mode != "CMYK" else folder / "odd.jpg", quality=100)
    name = "odd.png" if mode != "CMYK" else "odd.jpg"
    kind, what = outcome(folder, name)
    assert kind == "fixed" and expected_note in what
    decoded = open_image(folder / name)
    assert decoded.mode == "RGB"
    assert np.allclose(decoded.getpixel((16, 16)), expected_rgb, atol=3)


def test_exif_orientation_is_noted_and_the_size_is_upright(folder):
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    image.save(folder / "phone.jpg", exif=exif)
    result = find_records(cfg(folder))
    record = next(r for r in result.records if r.key == "phone.jpg")
    assert record.size == (32, 64)  # upright: taller than wide
    assert record.load().size == (32, 64)
    assert outcome(folder, "phone.jpg") == ("fixed", "turned upright (EXIF orientation 6)")


def test_images_over_the_pixel_limit_are_refused_without_decoding(folder):
    Image.new("RGB", (300, 300)).save(folder / "bomb.png")
    kind, reason = outcome(folder, "bomb.png", max_pixels=10_000)
    assert kind == "skipped" and "data.max_pixels" in reason and "decompression bomb" in reason


def test_images_smaller_than_the_target_are_upscaled_or_skipped(folder):
    Image.new("RGB", (16, 20)).save(folder / "tiny.png")
    kind, what = outcome(folder, "tiny.png")
    assert kind == "fixed" and "upscaled" in what and "16 x 20" in what
    kind, reason = outcome(folder, "tiny.png", upscale_small=False)
    assert kind == "skipped" and "data.upscale_small=false" in reason


def test_metadata_paths_that_escape_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "ok.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    (root / "metadata.csv").write_text(
        f"file_name,text\nok.png,fine\n../outside.png,up\n{tmp_path}/outside.png,abs\nlink.png,link\n"
    )
    result = find_records(cfg(root))
    assert [r.key for r in result.records] == ["ok.png"]
    reasons = {s.key.split(" ")[0]: s.reason for s in result.skipped}
    assert reasons == {
        f"{tmp_path}/outside.png": "absolute path refused — paths must be relative to the dataset root",
        "../outside.png": "path escapes the dataset root",
        "link.png": "path escapes the dataset root",
    }


def test_a_good_file_is_kept_as_is(folder):
    assert outcome(folder, "good.png") == ("kept", "")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_png_colour_key_is_transparency_composited_on_white_and_a_mask_under_alpha(folder, mode):
    """PNG's tRNS chunk marks one colour transparent in an RGB or greyscale image: PIL keeps it in `info`."""
    keyed, kept = ((255, 0, 255), (0, 0, 200)) if mode == "RGB" else (7, 100)
    image = Image.new(mode, (32, 32), kept)
    image.paste(keyed, (0, 0, 16, 32))  # the left half in the keyed colour
    image.save(folder / "keyed.png", transparency=keyed)
    kind, what = outcome(folder, "keyed.png")
    assert kind == "fixed" and "composited on white" in what
    decoded = open_image(folder / "keyed.png")
    assert decoded.getpixel((4, 16)) == (255, 255, 255)
    assert decoded.getpixel((28, 16)) == (kept if mode == "RGB" else (kept,) * 3)
    _, alpha = split_alpha(Image.open(folder / "keyed.png"))
    assert alpha is not None and alpha.getpixel((4, 16)) == 0 and alpha.getpixel((28, 16)) == 255
