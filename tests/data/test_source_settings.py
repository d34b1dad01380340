"""Settings per source (`data.sources` entries): captions, resolution, flip, crop, repeats, loss weight and
regularisation images, each falling back to `data.*` where a source leaves it unset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.config.errors import ConfigError
from finetune.config.schema import DataConfig, SourceConfig
from finetune.data import CaptionedImageDataModule
from finetune.data.report import build_report, format_report
from finetune.data.scan import check_data_config
from finetune.data.source_settings import regularisation_sources
from finetune.models.prompts import CaptionTokenizer
from finetune.tiny.vocab import build_tokenizer


def folder(root: Path, count: int, caption: str, size=(64, 48)) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", size, (30, 30, 30))
        image.paste((250, 250, 250), (0, 0, size[0] // 2, size[1]))  # left half white: shows a flip
        image.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CaptionTokenizer:
    return CaptionTokenizer(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def caption_of(tokenizer: CaptionTokenizer, item: dict) -> str:
    return tokenizer.tokenizer.decode(item["input_ids"], skip_special_tokens=True)


def test_each_source_trains_with_its_own_settings_and_data_fills_the_rest(tmp_path, tokenizer) -> None:
    data = DataConfig(
        resolution=32,
        random_flip=True,
        caption_suffix=" star",
        sources=[
            SourceConfig(path=str(folder(tmp_path / "a", 2, "red")), caption_prefix="circle "),
            SourceConfig(
                path=str(folder(tmp_path / "b", 2, "blue")),
                resolution=48,
                random_flip=False,
                crop="random",
                repeats=3,
                caption_prefix="square ",
                caption_suffix="",
                loss_weight=0.5,
            ),
        ],
    )
    module = CaptionedImageDataModule(data, tokenizer, seed=0)
    module.setup("fit")
    by_source = {record.key[0]: index for index, record in enumerate(module.records)}
    first, second = by_source["0"], by_source["1"]
    assert module.sizes[first] == (32, 32) and module.sizes[second] == (48, 48)
    assert module.records[first].repeats == 1 and module.records[second].repeats == 3
    seen_first = [module.dataset[(first, seed)] for seed in range(8)]
    seen_second = [module.dataset[(second, seed)] for seed in range(8)]
    assert caption_of(tokenizer, seen_first[0]) == "circle red star"  # its prefix, data's suffix
    assert caption_of(tokenizer, seen_second[0]) == "square blue"  # both its own
    assert {s["loss_weight"].item() for s in seen_first} == {1.0}
    assert {s["loss_weight"].item() for s in seen_second} == {0.5}
    assert not any(s["is_reg"] for s in seen_first + seen_second)
    # data.random_flip for the first source (both ways over 8 seeds); never for the second, which crops
    # at random instead (several crop offsets).
    left_is_white = {bool(s["pixel_values"][0, :, 0].mean() > 0) for s in seen_first}
    assert left_is_white == {True, False}
    assert all(s["pixel_values"][0, :, 0].mean() > 0 for s in seen_second)
    assert len({tuple(s["crop_top_left"].tolist()) for s in seen_second}) > 1


def test_regularisation_images_are_shown_as_often_as_the_rest_and_counted_apart(tmp_path) -> None:
    data = DataConfig(
        resolution=32,
        sources=[
            SourceConfig(path=str(folder(tmp_path / "instance", 4, "a sks dog"))),
            SourceConfig(path=str(folder(tmp_path / "class", 2, "a dog")), is_reg=True, weight=5),
        ],
    )
    module = CaptionedImageDataModule(data, None, seed=0)
    report = build_report(module.scan_result, module.sizes, reg_sources=regularisation_sources(data))
    assert report["instance_and_regularisation"] == {
        "instance": {"images": 4, "samples_per_epoch": 4.0},
        "regularisation": {"images": 2, "samples_per_epoch": 4.0},
    }
    assert "instance images: 4 (4 samples per epoch); regularisation images: 2 (4 samples" in format_report(
        report
    )
    assert json.dumps(report)  # JSON-ready


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"caption_dropout": 1.5}, "data.sources[1].caption_dropout: 1.5 must be between 0 and 1"),
        ({"repeats": 0}, "data.sources[1].repeats: 0 must be greater than 0"),
        ({"loss_weight": -1}, "data.sources[1].loss_weight: -1 must be 0 or more"),
    ],
)
def test_a_source_setting_out_of_range_is_one_line_naming_it(setting: dict, message: str) -> None:
    data = DataConfig(sources=[SourceConfig(path="a"), SourceConfig(path="b", **setting)])
    with pytest.raises(ConfigError) as error:
        check_data_config(data)
    assert str(error.value) == message


def test_a_source_without_settings_changes_nothing(tmp_path, tokenizer) -> None:
    """One source given as data.sources trains exactly as the same folder given as data.path."""
    root = folder(tmp_path / "a", 2, "red")
    settings = dict(resolution=32, random_flip=True, crop="random", caption_prefix="circle ")
    alone = CaptionedImageDataModule(DataConfig(path=str(root), **settings), tokenizer, seed=0)
    listed = CaptionedImageDataModule(
        DataConfig(sources=[SourceConfig(path=str(root))], **settings), tokenizer, seed=0
    )
    for module in (alone, listed):
        module.setup("fit")
    for seed in range(4):
        a, b = alone.dataset[(0, seed)], listed.dataset[(0, seed)]
        assert a.keys() == b.keys()  # no loss_weight / is_reg when every source is alike
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_a_source_resolution_is_screened_and_checked_as_its_own(tmp_path) -> None:
    from conftest import compose_config

    from finetune.training.checks import check_config

    small = folder(tmp_path / "small", 2, "red", size=(40, 40))
    data = DataConfig(
        resolution=32,
        upscale_small=False,
        repeats=3,  # every source's, when it sets none of its own
        sources=[SourceConfig(path=str(small)), SourceConfig(path=str(small), resolution=48, repeats=1)],
    )
    module = CaptionedImageDataModule(data, None, seed=0)
    assert {r.key[0] for r in module.records} == {"0"}  # 40 px is too small for 48 without upscaling
    assert {r.repeats for r in module.records} == {3.0}
    assert any("smaller than its target 48 x 48" in s.reason for s in module.scan_result.skipped)
    cfg = compose_config(
        ["model.build_tiny=true", "data.path=null", f"data.sources=[{{path: {small}, resolution: 31}}]"]
    )
    with pytest.raises(
        ConfigError, match=r"data.sources\[0\].resolution: 31 is not a multiple of the VAE factor"
    ):
        check_config(cfg)


def test_a_source_folder_inside_another_belongs_to_its_own_source_only(tmp_path) -> None:
    """Class images kept in a subfolder of the instance images are trained once, as class images."""
    from finetune.data.sources import find_records

    instance = folder(tmp_path / "dog", 2, "sks dog")
    folder(instance / "class", 3, "a dog")
    sources = [SourceConfig(path=str(instance)), SourceConfig(path=str(instance / "class"), is_reg=True)]
    found = find_records(DataConfig(resolution=32, sources=sources))
    by_source = {number: sorted(r.key for r in found.records if r.source == number) for number in (0, 1)}
    assert by_source == {0: ["0:0.png", "0:1.png"], 1: ["1:0.png", "1:1.png", "1:2.png"]}
