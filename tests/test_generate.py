"""`finetune-generate`: PNGs from the base model, with and without the exported adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR, compose_config, fast_overrides
from PIL import Image

from finetune.config.errors import ConfigError
from finetune.generate import generate
from finetune.train import train


def generate_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="generate", overrides=overrides)


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("gen-run")
    overrides = fast_overrides(tiny_model, run_dir, steps=3) + ["optim.lr=1e-2", "validation.every_n_steps=0"]
    return train(compose_config(overrides)).run_dir / "adapter"


def pixels(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=float) for p in paths])


def run(tiny_model: Path, out: Path, *extra: str) -> list[Path]:
    base = [
        f"model.pretrained={tiny_model}",
        f"out_dir={out}",
        "steps=3",
        "count=2",
        "prompt=[a red circle,a star]",
    ]
    return generate(generate_config(base + list(extra)))


def test_generate_writes_count_images_per_prompt(tiny_model: Path, tmp_path: Path) -> None:
    paths = run(tiny_model, tmp_path / "plain")
    assert len(paths) == 4 and all(p.suffix == ".png" for p in paths)
    assert Image.open(paths[0]).size == (32, 32)
    again = run(tiny_model, tmp_path / "again")
    assert np.array_equal(pixels(paths), pixels(again))  # fixed seeds
    with pytest.raises(Exception, match="already exists"):
        run(tiny_model, tmp_path / "plain")  # never overwrites


def test_adapter_dir_and_kohya_file_change_the_images_and_scale_zero_does_not(
    tiny_model: Path, adapter: Path, tmp_path: Path
) -> None:
    plain = pixels(run(tiny_model, tmp_path / "plain"))
    with_dir = pixels(run(tiny_model, tmp_path / "dir", f"adapter={adapter}"))
    assert np.abs(with_dir - plain).mean() > 0.5
    kohya = next(p for p in adapter.glob("*.safetensors") if p.name != "pytorch_lora_weights.safetensors")
    with_file = pixels(run(tiny_model, tmp_path / "file", f"adapter={kohya}"))
    assert np.abs(with_file - with_dir).max() <= 2  # same adapter, two formats
    off = pixels(run(tiny_model, tmp_path / "off", f"adapter={adapter}", "adapter_scale=0.0"))
    assert np.abs(off - plain).max() <= 1


def test_missing_adapter_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="adapter"):
        run(tiny_model, tmp_path / "x", f"adapter={tmp_path / 'nope'}")


class _Note:
    """A plain Python object in a .ckpt: harmless, but weights_only loading refuses it."""


def test_a_ckpt_model_needing_full_unpickling_opens_only_when_allowed(
    tiny_model: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from finetune.config.schema import ModelConfig
    from finetune.export.single_file import save_single_file
    from finetune.models.loading import load_components

    single = save_single_file(
        load_components(ModelConfig(pretrained=str(tiny_model))), tmp_path / "m.safetensors"
    )
    ckpt = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": load_file(single), "note": _Note()}, ckpt)
    model = [f"model.pretrained={ckpt}", f"model.single_file_config={tiny_model}"]
    with pytest.raises(ConfigError, match="weights_only"):
        run(tiny_model, tmp_path / "refused", *model)
    assert len(run(tiny_model, tmp_path / "out", *model, "allow_unsafe_pickle=true")) == 4


def test_clip_skip_2_draws_what_diffusers_draws_from_the_penultimate_layer(
    tiny_model: Path, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    # Without guidance: diffusers reads only the prompt at its clip_skip, and the negative prompt at the
    # last layer; we read both at the same layer, as A1111 and ComfyUI do.
    options = ("count=1", "guidance_scale=1.0")
    ours = pixels(run(tiny_model, tmp_path / "skip", "model.clip_skip=2", *options))
    plain = pixels(run(tiny_model, tmp_path / "plain", *options))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # diffusers 0.42 looks for the final norm where transformers 4 kept it (see tests/models/test_prompts.py)
    if not hasattr(pipe.text_encoder, "text_model"):
        norm = SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
        object.__setattr__(pipe.text_encoder, "text_model", norm)
    theirs = [
        np.asarray(
            pipe(
                prompt,
                num_inference_steps=3,
                guidance_scale=1.0,
                generator=torch.Generator("cpu").manual_seed(0),
                clip_skip=1,  # diffusers counts layers skipped: 1 is kohya's and A1111's 2
            ).images[0],
            dtype=float,
        )
        for prompt in ("a red circle", "a star")
    ]
    assert np.abs(ours - np.stack(theirs)).max() <= 1
    assert np.abs(ours - plain).mean() > 0.5


def test_a_long_prompts_tail_changes_the_image_when_max_token_length_reads_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    head = " ".join(["red"] * 90)
    prompts = f"prompt=[{head} blue star,{head} green square]"
    cut = pixels(run(tiny_model, tmp_path / "cut", prompts, "count=1"))
    assert np.array_equal(cut[0], cut[1])  # one window: the tails are cut
    read = pixels(run(tiny_model, tmp_path / "read", prompts, "count=1", "max_token_length=150"))
    assert np.abs(read[0] - read[1]).mean() > 0.5
    with pytest.raises(ConfigError, match="max_token_length: 100 must be 75, 150 or 225"):
        run(tiny_model, tmp_path / "bad", "max_token_length=100")
