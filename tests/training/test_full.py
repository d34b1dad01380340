"""`method=full`: every U-Net weight trains, an EMA follows, and a whole model is exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from finetune.train import train


@pytest.fixture(scope="module")
def full_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("full")
    overrides = fast_overrides(tiny_model, run_dir, steps=4) + [
        "method=full",
        "method.ema_decay=0.9",
        "optim.lr=1e-3",
        "model.zero_terminal_snr=true",
    ]
    return train(compose_config(overrides))


def test_full_run_trains_every_unet_weight_and_keeps_an_ema(full_run) -> None:
    module = full_run.module
    unet_params = list(module.unet.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in unet_params)
    assert not any(p.requires_grad for p in module.vae.parameters())
    ema = module.method.ema
    assert ema.optimization_step == 4
    # The EMA lags the trained weights: it is neither the start nor the end point.
    assert any(not torch.equal(s, p) for s, p in zip(ema.shadow_params, unet_params, strict=True))


def test_exported_pipeline_holds_the_ema_weights(full_run) -> None:
    model_dir = full_run.run_dir / "model"
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    ema = full_run.module.method.ema
    for exported, shadow in zip(pipe.unet.parameters(), ema.shadow_params, strict=True):
        torch.testing.assert_close(exported, shadow.cpu())
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    assert (full_run.run_dir / "model.safetensors").is_file()


def test_ema_state_is_checkpointed_and_restored(full_run, tiny_model: Path, tmp_path: Path) -> None:
    checkpoint = full_run.run_dir / "checkpoints" / "step_000002.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    ema_states = [v for k, v in state["callbacks"].items() if "EMACallback" in k]
    assert len(ema_states) == 1 and ema_states[0]["optimization_step"] == 2
    overrides = fast_overrides(tiny_model, tmp_path, steps=4) + ["method=full", "method.ema_decay=0.9"]
    resumed = train(compose_config(overrides + ["optim.lr=1e-3", f"resume={checkpoint}"]))
    assert resumed.module.method.ema.optimization_step == 4


def test_a_zero_terminal_snr_run_trains_v_on_pure_noise_at_the_end_and_marks_its_file(full_run) -> None:
    scheduler = full_run.module.noise_scheduler
    assert full_run.module.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1] == 0  # the last timestep holds no trace of the image
    assert scheduler.config.timestep_spacing == "trailing"
    exported = StableDiffusionPipeline.from_pretrained(full_run.run_dir / "model").scheduler.config
    assert exported.rescale_betas_zero_snr and exported.prediction_type == "v_prediction"
    with safe_open(full_run.run_dir / "model.safetensors", "pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys())  # what ComfyUI and A1111 look for
