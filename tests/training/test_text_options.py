"""`model.clip_skip`, `data.max_token_length` and `validation.prompts_file` in a training run: the data,
the cache, the U-Net's conditioning, the samples, the data report and the exported files' headers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import compose_config, fast_overrides
from PIL import Image
from safetensors import safe_open

from finetune.train import train

WORDS = "red circle blue star square".split()  # one token each in the tiny vocabulary


def caption(tokens: int, tail: str = "") -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens)) + (f" {tail}" if tail else "")


def test_a_run_reads_long_captions_at_clip_skip_2_and_says_so(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lengths = {"short": 10, "long": 120, "longer": 200}  # tokens; only `longer` is past 150
    for index, (name, tokens) in enumerate(lengths.items()):
        Image.new("RGB", (32, 32), (40 * index, 90, 200)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption(tokens))
    library = tmp_path / "prompts.txt"
    library.write_text(f"{caption(100)} --d 5\na blue star --w 48 --h 32 --s 1\n")
    run_dir = tmp_path / "run"
    overrides = fast_overrides(tiny_model, run_dir, steps=1) + [
        f"data.path={data}",
        f"validation.prompts_file={library}",
        "data.cache=memory",
        "data.max_token_length=150",
        "model.clip_skip=2",
        "+callbacks.shapes._target_=helpers.BatchShapes",
        f"+callbacks.shapes.out_dir={tmp_path / 'shapes'}",
    ]
    result = train(compose_config(overrides))

    # The cache holds each caption's 150-token features: start, 2 × 75 tokens, end.
    shapes = json.loads((tmp_path / "shapes" / "shapes.json").read_text())
    assert shapes["text_embeds"][1:] == [152, 32]
    prompts = result.module.components.prompts
    assert prompts.clip_skip == 2 and prompts.captions.chunks == 2
    with torch.no_grad():
        hidden = prompts.encode(**prompts.tokenize([caption(90, "yellow"), caption(90, "purple")])).hidden
    assert (hidden[0] - hidden[1]).abs().max() > 1e-2  # the U-Net sees tokens past 77

    # The samples follow the library: a 32-px row and a 48 × 32 one, two images each, tiles enlarged twice.
    assert Image.open(run_dir / "samples" / "step_000001.png").size == (
        2 * 2 * 48 + 3 * 2,
        2 * 2 * 32 + 3 * 2,
    )

    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["token_limit"] == 152 and report["captions_truncated"] == 1
    with safe_open(result.exported["kohya"], "pt") as handle:
        header = handle.metadata()
    assert header["ss_clip_skip"] == "2" and header["ss_max_token_length"] == "150"
