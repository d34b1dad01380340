"""Training options reach the run: precision and dtypes, gradient checkpointing, LR schedules, models."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides
from omegaconf import OmegaConf

import finetune.models.speed
from finetune.train import train


def logged_lrs(run_dir: Path) -> list[float]:
    """The learning rate at each optimizer step (logged once per batch, so twice when accumulating)."""
    with open(run_dir / "csv" / "metrics.csv") as handle:
        by_step = {
            int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(handle) if row.get("train/lr")
        }
    return [by_step[step] for step in sorted(by_step)]


@pytest.mark.slow
def test_bf16_mixed_keeps_frozen_weights_in_bf16_and_trainables_in_fp32(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = fast_overrides(tiny_model, tmp_path, steps=2)
    overrides += ["trainer.precision=bf16-mixed", "model.gradient_checkpointing=true"]
    overrides += ["trainer.enable_progress_bar=false"]  # no bar at all (our bar must not force one)
    # As on a CPU without bf16 instructions (this suite's usual machine): the run says so, once, and trains.
    monkeypatch.setattr(finetune.models.speed, "cpu_runs_bf16_natively", lambda: False)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        result = train(compose_config(overrides))
    warned = [r.getMessage() for r in caplog.records if "without bf16 instructions" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("trainer.precision=bf16-mixed on a CPU"), warned
    assert warned[0].endswith("set trainer.precision=32-true")
    module = result.module
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.metrics["train/loss"]))
    assert module.unet.is_gradient_checkpointing
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.unet.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert module.vae.dtype == torch.bfloat16 and module.text_encoder.dtype == torch.bfloat16
    assert (tmp_path / "samples" / "step_000002.png").is_file()


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        # 2 warmup steps then the schedule, over 6 optimizer steps; lr = 1e-3.
        ("constant", [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3]),
        ("linear", [0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4]),
    ],
)
def test_warmup_then_schedule_with_gradient_accumulation(
    tiny_model: Path, tmp_path: Path, scheduler: str, expected: list[float]
) -> None:
    overrides = fast_overrides(tiny_model, tmp_path, steps=6)
    overrides += [
        f"optim.scheduler={scheduler}",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "trainer.accumulate_grad_batches=2",
        "validation.every_n_steps=0",
        "validation.prompts=[]",
    ]
    result = train(compose_config(overrides))
    assert result.global_step == 6  # optimizer steps, each from 2 batches
    assert logged_lrs(tmp_path) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("model, resolution", [("sd15", 512), ("sd21", 768), ("sdxl", 1024), ("tiny", 32)])
def test_model_configs_set_resolution_for_data_and_samples(model: str, resolution: int) -> None:
    cfg = compose_config([f"model={model}", "run_dir=/unused"])
    assert cfg.model.resolution == resolution and cfg.data.resolution == resolution
    assert cfg.model.prediction_type is None  # taken from the model's scheduler config


def test_sd15_recipe_composes_with_a_real_model_setup() -> None:
    cfg = compose_config(["experiment=sd15_style_lora", "data.path=/my/style", "run_dir=/unused"])
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.data.resolution == 512 and cfg.data.path == "/my/style"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.method.rank == 16
    assert set(cfg.logger) == {"tensorboard", "wandb"}


def test_sdxl_recipe_is_the_sd15_one_on_sdxl_at_1024_px() -> None:
    cfg = compose_config(["experiment=sdxl_style_lora", "data.path=/my/style", "run_dir=/unused"])
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.data.resolution == 1024 and cfg.data.buckets and cfg.data.cache == "memory"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.method.rank == 16 and cfg.name == "sdxl_style_lora"


def test_loraplus_and_the_text_encoder_rate_give_each_weight_its_learning_rate(tiny_model, tmp_path):
    """optim.loraplus_ratio multiplies the B matrices' rate (LoRA+), optim.text_encoder_lr sets the text
    encoder's; every trainable weight is in exactly one group, and the run trains with those groups."""
    overrides = fast_overrides(tiny_model, tmp_path, steps=1) + [
        "method.train_text_encoder=true",
        "optim.lr=1e-4",
        "optim.text_encoder_lr=5e-5",
        "optim.loraplus_ratio=16",
        "validation.every_n_steps=0",
        "checkpoint.every_n_steps=0",
    ]
    result = train(compose_config(overrides))
    module = result.module
    optimizer = module.trainer.optimizers[0]
    lr_of = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(named) == sum(len(g["params"]) for g in optimizer.param_groups)
    expected = {
        ("unet", "lora_A"): 1e-4,
        ("unet", "lora_B"): 16e-4,
        ("text_encoder", "lora_A"): 5e-5,
        ("text_encoder", "lora_B"): 80e-5,
    }
    seen = set()
    for name, parameter in named:
        key = (name.split(".")[0], "lora_B" if ".lora_B." in name else "lora_A")
        assert lr_of[id(parameter)] == pytest.approx(expected[key]), name
        seen.add(key)
    assert seen == set(expected)


@pytest.mark.parametrize("accelerator, on_cpu", [("cpu", True), ("auto", True), ("gpu", False)])
def test_a_run_is_on_the_cpu_by_its_accelerator_or_for_want_of_a_gpu(
    monkeypatch: pytest.MonkeyPatch, accelerator: str, on_cpu: bool
) -> None:
    from finetune.models.speed import runs_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runs_on_cpu(accelerator) is on_cpu


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_flagged_where_the_cpu_lacks_it_in_training_and_generating(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native: bool
) -> None:
    from finetune.generate import _device_and_dtype
    from finetune.models.speed import warn_about_bf16_on_this_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(finetune.models.speed, "cpu_runs_bf16_natively", lambda: native)
    warn_about_bf16_on_this_cpu("trainer.precision=bf16-true", "trainer.precision=32-true")
    _device_and_dtype(OmegaConf.create({"device": "auto", "dtype": "bfloat16"}))  # generate on the CPU
    _device_and_dtype(OmegaConf.create({"device": "auto", "dtype": "float32"}))
    messages = [r.getMessage().split(" on a CPU")[0] for r in caplog.records]
    assert messages == ([] if native else ["trainer.precision=bf16-true", "dtype=bfloat16"])
