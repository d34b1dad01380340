"""Masked training (data.masks): the loss weighs each latent element by its share of the mask, so what
lies outside the mask gets no gradient, with the per-sample weights (min-SNR, debiased, Huber) intact."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config, fast_overrides, logged_metric
from diffusers import DDPMScheduler
from PIL import Image

from finetune.config.errors import ConfigError
from finetune.config.schema import LossConfig, OptimConfig
from finetune.data.masks import to_latent_grid
from finetune.train import train
from finetune.training.losses import debiased_weights, huber_thresholds, min_snr_weights
from finetune.training.module import DiffusionModule


class FixedPrediction:
    """A method whose 'denoiser' returns one tensor we hold, to read the loss's gradient on it."""

    def __init__(self, prediction: torch.Tensor) -> None:
        self.prediction = prediction

    def trainable_modules(self, components) -> list:
        return []

    def denoise(self, components, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        return self.prediction


def module_with(prediction: torch.Tensor, loss: LossConfig) -> DiffusionModule:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    parts = dict(unet=None, vae=None, text_encoder=None, text_encoder_2=None, controlnet=None)
    components = SimpleNamespace(**parts, noise_scheduler=scheduler, is_sdxl=False)
    return DiffusionModule(components, FixedPrediction(prediction), loss, OptimConfig())


def pixel_mask() -> torch.Tensor:
    """[2, 1, 16, 16] masks for an 8 x 8 latent grid (2 x 2 pixels per element): sample 0 keeps its
    right half and one pixel of element (0, 0) (weight 1/4); sample 1 keeps nothing."""
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :, 8:] = 1
    mask[0, :, 0, 0] = 1
    return mask


@pytest.mark.parametrize("loss_type", ["l2", "huber", "smooth_l1"])
def test_what_the_mask_leaves_out_gets_no_gradient_and_the_rest_is_weighted(loss_type: str) -> None:
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    timesteps = torch.tensor([50, 700])
    loss_cfg = LossConfig(snr_gamma=5.0, debiased_estimation=True, type=loss_type, huber_c=0.1)
    module = module_with(prediction, loss_cfg)
    batch = {"text_embeds": torch.zeros(2, 3, 8), "loss_mask": pixel_mask()}
    loss = module.denoising_loss(batch, noise=noise, timesteps=timesteps, latents=latents)
    loss.backward()

    weight = to_latent_grid(pixel_mask(), (8, 8)).expand(2, 4, 8, 8)
    assert weight[0, 0, 0, 0] == 0.25 and weight[0, 0, 0, 7] == 1 and weight[1].max() == 0
    gradient = prediction.grad
    assert torch.equal(gradient[weight == 0], torch.zeros_like(gradient[weight == 0]))
    assert (gradient[weight > 0] != 0).all()
    # The value: each element's loss times its weight, the plain mean over all elements (not over the
    # kept area, as kohya does), times the sample's min-SNR and debiased weights, averaged.
    scheduler = module.noise_scheduler
    difference = prediction.detach() - noise  # epsilon prediction: the target is the noise
    if loss_type == "l2":
        elementwise = difference.square()
    else:
        c = huber_thresholds(scheduler, timesteps, 0.1, "snr").view(-1, 1, 1, 1)
        smooth = (difference.square() + c.square()).sqrt() - c
        elementwise = 2 * c * smooth if loss_type == "huber" else 2 * smooth
    per_sample = (elementwise * weight).mean(dim=(1, 2, 3))
    per_sample = per_sample * min_snr_weights(scheduler, timesteps, 5.0, "epsilon")
    per_sample = per_sample * debiased_weights(scheduler, timesteps, "epsilon")
    torch.testing.assert_close(loss.detach(), per_sample.mean())


def test_a_mask_that_keeps_everything_gives_the_unmasked_loss_exactly() -> None:
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    module = module_with(torch.randn(2, 4, 8, 8), LossConfig(snr_gamma=5.0))
    batch = {"text_embeds": torch.zeros(2, 3, 8)}
    timesteps = torch.tensor([10, 900])
    plain = module.denoising_loss(batch, noise=noise, timesteps=timesteps, latents=latents)
    batch["loss_mask"] = torch.ones(2, 1, 8, 8)  # already on the latent grid, as the cache stores it
    assert torch.equal(module.denoising_loss(batch, noise=noise, timesteps=timesteps, latents=latents), plain)


def masked_folder(root: Path) -> Path:
    """Two images: one wholly transparent (it trains nothing) and one without alpha (it trains whole)."""
    root.mkdir()
    Image.new("RGBA", (32, 32), (200, 30, 30, 0)).save(root / "clear.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(root / "solid.png")
    for name in ("clear", "solid"):
        (root / f"{name}.txt").write_text(f"a {name} square")
    return root


def test_training_with_alpha_masks_runs_and_a_transparent_image_adds_no_loss(tiny_model, tmp_path):
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=2) + [
        f"data.path={masked_folder(tmp_path / 'data')}",
        "data.masks=alpha",
        "data.batch_size=1",
        "validation.every_n_steps=0",
        "validation.prompts=[]",
    ]
    result = train(compose_config(overrides))
    assert result.global_step == 2
    # One epoch of two single-image batches: the transparent image's loss is exactly 0.
    losses = sorted(logged_metric(tmp_path / "run", "train/loss").values())
    assert len(losses) == 2 and losses[0] == 0.0 and losses[1] > 0
    notes = json.loads((tmp_path / "run" / "data_report.json").read_text())["notes"]
    assert any(note.startswith("data.masks=alpha: 1 of 2 images have no alpha channel") for note in notes)


def test_a_mask_folder_that_does_not_exist_fails_in_one_line_before_any_model_loads(
    tmp_path, monkeypatch
) -> None:
    import finetune.models.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(finetune.models.loading, "load_components", no_loading)
    missing = tmp_path / "masks"
    cfg = compose_config(fast_overrides(tmp_path / "never", tmp_path / "run") + [f"data.masks={missing}"])
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    message = str(raised.value)
    assert message.startswith(f"data.masks: '{missing}' does not exist") and "\n" not in message
