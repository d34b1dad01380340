"""The data report: counts, bucket histogram, caption lengths and every skipped file with its reason."""

from __future__ import annotations

import json

from conftest import REPO, run_module
from hydra import compose, initialize_config_dir
from PIL import Image

from finetune.data_tool import data_report


def _folder(root):
    root.mkdir()
    for i, size in enumerate([(32, 32), (32, 32), (96, 32)]):
        Image.new("RGB", size, (i * 60, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a red circle, " * (i + 1))
    (root / "broken.png").write_bytes(b"")
    Image.new("CMYK", (32, 32)).save(root / "print.jpg")
    return root


def data_tool_config(root, model, *overrides: str):
    """`conf/data_tool.yaml` composed as `finetune-data` does, on `root` with the tiny `model`."""
    base = [f"data.path={root}", f"model.pretrained={model}", "data.resolution=32"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="data_tool", overrides=base + list(overrides))


def test_report_counts_buckets_captions_and_lists_skips(tmp_path, tiny_model, capsys):
    root = _folder(tmp_path / "data")
    report_file = f"report={tmp_path / 'report.json'}"
    cfg = data_tool_config(root, tiny_model, "data.buckets=true", "data.bucket_step=8", report_file)
    report = data_report(cfg)
    assert report["images"] == 4 and report["skipped"] == 1 and report["fixed"] == 1
    assert report["uncaptioned"] == 1 and report["uncaptioned_files"] == ["print.jpg"]  # no caption file
    assert report["buckets"] == {"32x32": 3, "48x16": 1}
    assert report["caption_words"] == {"min": 0, "mean": 4.5, "max": 9}
    assert report["caption_tokens"]["max"] > report["caption_words"]["max"]
    assert report["skipped_files"] == [{"file": "broken.png", "reason": report["skipped_files"][0]["reason"]}]
    assert "not a readable image" in report["skipped_files"][0]["reason"]
    assert report["fixed_files"] == [{"file": "print.jpg", "fix": "CMYK converted to RGB"}]
    printed = capsys.readouterr().out
    assert "broken.png: not a readable image" in printed and "48x16" in printed
    assert "without a caption (data.missing_caption):\n  print.jpg" in printed
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_finetune_data_command_prints_the_report_and_makes_no_run_folder(tmp_path):
    root = _folder(tmp_path / "data")
    args = [f"data.path={root}", "model=tiny_random", f"model.pretrained={tmp_path / 'model'}"]
    done = run_module("finetune.data_tool", args, cwd=tmp_path)
    assert "images: 4 usable, 1 skipped, 1 fixed" in done.stdout
    assert "broken.png" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model"]  # no outputs/, no .hydra/


def test_finetune_data_fills_the_disk_cache_ahead_of_training(tmp_path, tiny_model, capsys):
    root = _folder(tmp_path / "data")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    cfg = data_tool_config(root, tiny_model, "data.cache=disk", cache, "data.random_flip=false")
    data_report(cfg)
    assert "cache: 8 entries computed, 0 already there" in capsys.readouterr().out  # 4 images, 4 captions
    data_report(cfg)
    assert "cache: 0 entries computed, 8 already there" in capsys.readouterr().out
