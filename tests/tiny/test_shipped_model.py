"""The pretrained tiny model in data/tiny-sd: it loads like any diffusers model, follows prompts, and a
short LoRA run on the bundled style set moves its samples towards that style."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from conftest import REPO, STYLE_DATA, compose_config
from diffusers import StableDiffusionPipeline
from PIL import Image

from finetune.tiny.metrics import adherence, style_strength
from finetune.tiny.scenes import COLOURS, SHAPES, STYLE_SUFFIX, caption_for

SHIPPED = REPO / "data" / "tiny-sd"
STEPS = 100
# 12 of the 24 colour x shape pairs: every colour twice, every shape three times.
PROMPTS = [caption_for(c, s) for c, s in itertools.islice(itertools.product(COLOURS, SHAPES), 0, 24, 2)]


def sample(pipe: StableDiffusionPipeline, prompts: list[str], steps: int = 12) -> list[Image.Image]:
    """One image per prompt, prompt i with seed i: two calls differ only by the weights."""
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=generators).images


@pytest.fixture(scope="module")
def shipped_pipeline() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        SHIPPED, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_safetensors_and_the_default_model() -> None:
    weights = sorted(p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not list(SHIPPED.rglob("*.bin")) and not list(SHIPPED.rglob("*.ckpt"))
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*")) < 20 * 2**20
    assert (SHIPPED / "README.md").is_file()  # the model card
    cfg = compose_config([])
    assert Path(cfg.model.pretrained) == SHIPPED and not cfg.model.build_tiny
    assert Path(cfg.data.path) == STYLE_DATA  # found from any working directory


def test_shipped_model_draws_the_colour_and_shape_asked_for(shipped_pipeline) -> None:
    images = sample(shipped_pipeline, PROMPTS)
    assert all(image.size == (32, 32) for image in images)
    scores = adherence(images, PROMPTS)
    # Measured: colour 11/12 (orange and purple drift to red), shape 12/12. A model that ignores its
    # prompt gets 1/6 of colours and 1/4 of shapes right: P(>= 8/12 colours by chance) < 0.1%.
    assert scores["colour"] >= 8 / 12, scores
    assert scores["shape"] >= 0.75, scores


def test_short_lora_run_moves_samples_towards_the_style(shipped_pipeline, tmp_path: Path) -> None:
    from finetune.train import train

    overrides = [
        "experiment=tiny_style",  # what `make train` runs, a third as long
        f"run_dir={tmp_path / 'run'}",
        f"trainer.max_steps={STEPS}",
        "trainer.enable_model_summary=false",
        "validation.every_n_steps=1000",  # only the start and end grids
        "validation.num_inference_steps=2",
        "checkpoint.every_n_steps=1000",
        "logger=csv",
    ]
    result = train(compose_config(overrides))
    styled = [prompt + STYLE_SUFFIX for prompt in PROMPTS]
    base = sample(shipped_pipeline, styled)
    shipped_pipeline.load_lora_weights(result.run_dir / "adapter")
    try:
        tuned = sample(shipped_pipeline, styled)
    finally:
        shipped_pipeline.unload_lora_weights()
    style = [Image.open(p).convert("RGB") for p in sorted(STYLE_DATA.glob("*.png"))]
    strength = style_strength(base, tuned, style)
    assert strength > 0.1, f"style strength {strength:.3f} after {STEPS} LoRA steps"
