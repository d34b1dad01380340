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
        "loss.prediction_type=v_prediction",  # on the schedule, so samples and exports say it too
        "+callbacks.shapes._target_=helpers.BatchShapes",
        f"+callbacks.shapes.out_dir={tmp_path / 'shapes'}",
    ]
    result = train(compose_config(overrides))

    # The cache holds each caption's 150-token features: start, 2 × 75 tokens, end.
    shapes = json.loads((tmp_path / "shapes" / "shapes.json").read_text())
    assert shapes["text_embeds"][1:] == [152, 32]
    assert result.module.noise_scheduler.config.prediction_type == "v_prediction"
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


def test_clip_skip_leaves_no_text_encoder_lora_that_never_trains(tiny_model: Path) -> None:
    """Layers after the one clip_skip reads would get no gradient (and DDP refuses unused weights)."""
    from finetune.config.methods import LoraMethodConfig
    from finetune.config.schema import ModelConfig
    from finetune.models.loading import load_components
    from finetune.training.methods import build_method

    components = load_components(ModelConfig(pretrained=str(tiny_model), clip_skip=2))
    components = build_method(LoraMethodConfig(rank=2, train_text_encoder=True)).prepare(components)
    prompts = components.prompts
    prompts.encode(**prompts.tokenize(["a red circle"])).hidden.square().sum().backward()
    trainable = {n: p for n, p in components.text_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values())
    assert not any(".layers.1." in name for name in trainable)  # the last of the tiny encoder's 2


def test_generate_reads_a_text_encoder_lora_at_the_adapter_scale(tiny_model: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from finetune.generate import text_lora_scale
    from finetune.models.prompts import pipeline_prompt_encoder, pipeline_text_inputs

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    side = pipeline_prompt_encoder(pipe, clip_skip=2)  # our own encoding, not the pipeline's
    before = pipeline_text_inputs(side, ["a red circle"], None, pipe)["prompt_embeds"]
    pipe.text_encoder.add_adapter(
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        full = pipeline_text_inputs(side, ["a red circle"], None, pipe)["prompt_embeds"]
        with text_lora_scale(pipe, 0.0):
            off = pipeline_text_inputs(side, ["a red circle"], None, pipe)["prompt_embeds"]
        again = pipeline_text_inputs(side, ["a red circle"], None, pipe)["prompt_embeds"]
    assert (full - before).abs().max() > 1e-3
    torch.testing.assert_close(off, before)  # scale 0: the base encoder
    torch.testing.assert_close(again, full)  # and back to full strength after
