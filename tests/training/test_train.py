"""End to end on the tiny model: the embedded run, its files, learning, resume and export fidelity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, fast_overrides
from PIL import Image
from safetensors import safe_open

from finetune.train import train


@pytest.fixture(scope="module")
def embedded_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("embedded")
    return train(compose_config(fast_overrides(tiny_model, run_dir, steps=4) + ["optim.lr=1e-2"]))


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_embedded_run_writes_checkpoints_samples_and_both_exports(embedded_run) -> None:
    run_dir = embedded_run.run_dir
    assert embedded_run.global_step == 4
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt"]
    samples = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert samples == ["before_after.png", "step_000000.png", "step_000002.png", "step_000004.png"]
    # One prompt x 2 images; the 32-px samples are shown as 128-px tiles, with make_grid's 2-px padding.
    assert Image.open(run_dir / "samples" / "step_000004.png").size == (2 + 2 * (128 + 2), 128 + 4)
    exported = {p.name for p in (run_dir / "adapter").iterdir()}
    assert "pytorch_lora_weights.safetensors" in exported
    assert any(
        name != "pytorch_lora_weights.safetensors" and name.endswith(".safetensors") for name in exported
    )
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["images"] == 40 and report["skipped"] == 0 and report["buckets"] == {"32x32": 40}


def test_checkpoint_holds_trainable_weights_and_optimizer_only(embedded_run) -> None:
    checkpoint = torch.load(embedded_run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora" in key for key in keys)
    trainable = {n for n, p in embedded_run.module.named_parameters() if p.requires_grad}
    assert set(keys) == trainable
    assert checkpoint["global_step"] == 4
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(trainable)  # AdamW moments per weight


def test_loss_lr_grad_norm_and_throughput_are_logged(embedded_run) -> None:
    rows = read_metrics(embedded_run.run_dir)
    columns = set(rows[0])
    # Lightning adds the all-device "train/samples_per_sec" beside this one when world_size > 1.
    for name in ("train/loss", "train/grad_norm", "train/lr", "train/device/samples_per_sec"):
        assert name in columns, f"{name} not logged; got {sorted(columns)}"
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_samples_change_as_the_lora_trains(embedded_run) -> None:
    before = np.asarray(Image.open(embedded_run.run_dir / "samples" / "step_000000.png"), dtype=float)
    after = np.asarray(Image.open(embedded_run.run_dir / "samples" / "step_000004.png"), dtype=float)
    # Fixed seeds: with unchanged weights the grids would be identical.
    assert before.shape == after.shape and not np.array_equal(before, after)
    # ...and the before/after picture is those two grids side by side.
    both = np.asarray(Image.open(embedded_run.run_dir / "samples" / "before_after.png"), dtype=float)
    width = before.shape[1]
    assert np.array_equal(both[:, :width], before) and np.array_equal(both[:, -width:], after)


def unet_output(unet, text_encoder, generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """U-Net and text-encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(generator_seed)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    input_ids = torch.randint(0, 600, (1, 77), generator=g)
    with torch.no_grad():
        embeddings = text_encoder(input_ids)[0]
        return unet(latents, torch.tensor([500]), embeddings).sample, embeddings


@pytest.mark.slow
def test_exported_lora_loads_into_diffusers_with_the_trained_outputs(
    tiny_model: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=3)
    overrides += ["method.train_text_encoder=true", "optim.lr=5e-3", "validation.every_n_steps=0"]
    result = train(compose_config(overrides))
    module = result.module.eval()
    trained, trained_text = unet_output(module.unet, module.text_encoder)

    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base_out, base_text = unet_output(base.unet, base.text_encoder)
    assert not torch.allclose(trained, base_out, atol=1e-4)
    assert not torch.allclose(trained_text, base_text, atol=1e-4)

    adapter = result.run_dir / "adapter"
    files = {p.name: p for p in adapter.glob("*.safetensors")}
    for weight_name in files:  # the diffusers file and the kohya file
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.load_lora_weights(adapter, weight_name=weight_name)
        out, text = unet_output(pipe.unet, pipe.text_encoder)
        torch.testing.assert_close(text, trained_text, atol=1e-5, rtol=1e-4, msg=weight_name)
        torch.testing.assert_close(out, trained, atol=1e-5, rtol=1e-4, msg=weight_name)
        with safe_open(files[weight_name], "pt") as handle:
            header = handle.metadata()
        assert any(str(tiny_model) in value for value in header.values()), weight_name
        assert any(value == "3" for value in header.values()), weight_name  # steps


@pytest.mark.slow
def test_loss_falls_when_overfitting_a_few_images(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "four"
    data.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (32, 32), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {colour} square")
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=60)
    overrides += [f"data.path={data}", "data.batch_size=4", "optim.lr=3e-3", "validation.every_n_steps=0"]
    overrides += ["data.random_flip=false", "method.rank=16"]
    cfg = compose_config(overrides)

    from finetune.data import CaptionedImageDataModule
    from finetune.models.loading import load_components
    from finetune.training.methods import build_method
    from finetune.training.module import DiffusionModule

    # The same fixed noise and timesteps before and after: only the weights differ.
    components = load_components(cfg.model)
    components = build_method(cfg.method).prepare(components)
    datamodule = CaptionedImageDataModule(cfg.data, components.tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 4, 16, 16, generator=g)
    timesteps = torch.tensor([100, 300, 500, 700])

    def fixed_loss(module) -> float:
        with torch.no_grad():
            return module.denoising_loss(batch, noise, timesteps).item()

    before = fixed_loss(DiffusionModule(components, build_method(cfg.method), cfg.loss, cfg.optim))
    result = train(cfg)
    after = fixed_loss(result.module.eval())
    assert after < 0.8 * before, (before, after)


def test_resume_continues_at_the_saved_step_with_the_saved_weights(tiny_model: Path, tmp_path: Path) -> None:
    first = train(compose_config(fast_overrides(tiny_model, tmp_path / "first", steps=4)))
    resumed_cfg = fast_overrides(tiny_model, tmp_path / "resumed", steps=4)
    resumed_cfg += [f"resume={first.run_dir / 'checkpoints' / 'step_000002.ckpt'}"]
    resumed = train(compose_config(resumed_cfg))
    assert resumed.global_step == 4
    steps = sorted(p.name for p in (resumed.run_dir / "samples").glob("*.png"))
    assert steps == ["step_000002.png", "step_000004.png"]  # started at step 2, not 0
    # Same weights and seeds at step 2 → the same picture as the first run drew at step 2.
    a = np.asarray(Image.open(first.run_dir / "samples" / "step_000002.png"))
    b = np.asarray(Image.open(resumed.run_dir / "samples" / "step_000002.png"))
    assert np.array_equal(a, b)
    logged = [int(r["step"]) for r in read_metrics(resumed.run_dir) if r.get("train/loss")]
    assert min(logged) >= 2
