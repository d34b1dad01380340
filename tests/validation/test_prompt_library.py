"""The validation prompt library: kohya's prompt lines and yaml / json records, each prompt drawn at its
own size, seed, guidance and steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from finetune.config.errors import ConfigError
from finetune.validation.prompt_library import SamplePrompt, parse_prompt_line, sample_prompts
from finetune.validation.samples import generate_grid

VALIDATION = SimpleNamespace(
    prompts=["a photo"],
    prompts_file=None,
    negative_prompt="",
    seed=3,
    guidance_scale=7.5,
    num_inference_steps=25,
)
DEFAULTS = SamplePrompt("", "", 512, 512, 3, 7.5, 25)


def test_kohya_flags_set_each_setting_and_the_rest_come_from_validation() -> None:
    line = "a castle, mystyle --n blurry, low quality --w 768 --h 512 --d 42 --l 6.5 --s 30"
    assert parse_prompt_line(line, DEFAULTS) == SamplePrompt(
        "a castle, mystyle", "blurry, low quality", 768, 512, 42, 6.5, 30
    )
    assert parse_prompt_line("a red circle --d 7", DEFAULTS) == SamplePrompt(
        "a red circle", "", 512, 512, 7, 7.5, 25
    )
    assert parse_prompt_line("a cat --W 64 --H 32", DEFAULTS).width == 64  # flags in either case
    # Order is free; a "--" that is not a flag is part of the prompt.
    assert parse_prompt_line("a -- b --s 4 --w 64", DEFAULTS) == SamplePrompt(
        "a -- b", "", 64, 512, 3, 7.5, 4
    )
    # --ss: a sampler of ours, by our name or kohya's.
    assert parse_prompt_line("a cat --ss euler_a", DEFAULTS).sampler == "euler_a"
    assert parse_prompt_line("a cat --ss k_euler", DEFAULTS).sampler == "euler"
    assert parse_prompt_line("a cat --ss DPMSolver++ --s 4", DEFAULTS).sampler == "dpmpp_2m"
    assert parse_prompt_line("a cat", DEFAULTS).sampler is None  # validation.scheduler's


@pytest.mark.parametrize(
    "line, message",
    [
        ("a cat --x 3", "line 1: unknown flag --x"),
        ("a cat --w 500", "line 1: width 500 must be a positive multiple of 8"),
        ("a cat --d seven", "line 1: seed 'seven' is not a int"),
        ("--w 512", "line 1: the prompt is empty"),
        ("a cat --ss heun", "line 1: sampler: 'heun' is not one of euler, euler_a, ddim, dpmpp_2m"),
    ],
)
def test_a_bad_line_is_one_line_naming_where(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        sample_prompts(SimpleNamespace(**{**vars(VALIDATION), "prompts_file": str(path)}), 512)
    assert str(error.value).startswith("validation.prompts_file: prompts.txt") and "\n" not in str(
        error.value
    )


def test_text_yaml_and_json_libraries_read_alike(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text(
        "# comments and blank lines are skipped\n\na red circle --w 64\n  a star --n dark --d 9\n"
    )
    records = [
        {"prompt": "a red circle", "width": 64, "negative_prompt": None},  # null: as if absent
        {"prompt": "a star", "negative_prompt": "dark", "seed": 9},
    ]
    (tmp_path / "p.yaml").write_text(
        "prompts:\n  - prompt: a red circle\n    width: 64\n  - {prompt: a star, "
        "negative_prompt: dark, seed: 9}\n"
    )
    (tmp_path / "p.json").write_text(json.dumps(records))
    want = [
        SamplePrompt("a red circle", "", 64, 32, 3, 7.5, 25),
        SamplePrompt("a star", "dark", 32, 32, 9, 7.5, 25),
    ]
    for name in ("p.txt", "p.yaml", "p.json"):
        cfg = SimpleNamespace(**{**vars(VALIDATION), "prompts_file": str(tmp_path / name)})
        assert sample_prompts(cfg, 32) == want, name
    (tmp_path / "bad.yaml").write_text("- {prompt: a, size: 3}\n")
    with pytest.raises(ConfigError, match="bad.yaml record 1: unknown key"):
        sample_prompts(
            SimpleNamespace(**{**vars(VALIDATION), "prompts_file": str(tmp_path / "bad.yaml")}), 32
        )
    assert [p.prompt for p in sample_prompts(VALIDATION, 32)] == ["a photo"]


def test_each_row_is_drawn_at_the_size_seed_guidance_and_steps_its_prompt_asks_for(tiny_model: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [
        SamplePrompt("a red circle", "", 32, 32, 0, 7.5, 2),
        parse_prompt_line("a blue star --w 48 --h 32 --d 42 --l 1 --s 3", DEFAULTS),
        parse_prompt_line("a red circle --d 0 --s 2 --w 32 --h 32 --ss k_euler_a", DEFAULTS),
    ]
    grid, samples = generate_grid(pipe, prompts, images_per_prompt=2)
    assert [tuple(s.shape) for s in samples] == [(2, 3, 32, 32), (2, 3, 32, 48), (2, 3, 32, 32)]
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)  # the grid's sampler again afterwards
    # The --ss row: the first row's prompt and settings, drawn by Euler ancestral instead of Euler.
    assert not torch.allclose(samples[2], samples[0], atol=1e-3)
    euler = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(euler.config)
    ancestral = pipe(
        ["a red circle"] * 2,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)],
        output_type="pt",
    ).images
    pipe.scheduler = euler
    torch.testing.assert_close(samples[2], ancestral)
    for i in range(2):  # image i of a row: seed + i
        alone = pipe(
            "a blue star",
            height=32,
            width=48,
            num_inference_steps=3,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(42 + i),
            output_type="pt",
        ).images[0]
        torch.testing.assert_close(samples[1][i], alone)
    # Tiles enlarged by one factor (128 // 48 = 2), the smaller ones centred on white: 3 rows of 2.
    assert tuple(grid.shape) == (3, 3 * 64 + 4 * 2, 2 * 96 + 3 * 2)
    assert grid[:, 2, 2:18].eq(1).all()  # the 32-px row's tile sits 16 px in from the left edge
