"""The data report of a training run is written once the data is final: images the cache pre-pass
could not decode are named in it, with their reason."""

from __future__ import annotations

import json
import shutil

from conftest import STYLE_DATA, compose_config, fast_overrides

from finetune.train import train


def _corrupt_inside(path) -> None:
    """Damage the compressed pixels but keep the header and the end: screening cannot tell."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    path.write_bytes(bytes(data))


def test_images_the_cache_pre_pass_drops_are_in_the_run_report(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("000", "001", "002", "003"):
        for suffix in (".png", ".txt"):
            shutil.copy(STYLE_DATA / f"{name}{suffix}", data / f"{name}{suffix}")
    _corrupt_inside(data / "002.png")
    run_dir = tmp_path / "run"
    overrides = fast_overrides(tiny_model, run_dir, steps=1) + [
        f"data.path={data}",
        "data.cache=memory",
        "validation.every_n_steps=0",
    ]
    train(compose_config(overrides))
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["images"] == 3 and report["skipped"] == 1
    [skipped] = report["skipped_files"]
    assert skipped["file"].endswith("002.png") and "decode" in skipped["reason"]
