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
from safetensors.torch import load_file

from finetune.config.errors import ConfigError
from finetune.config.schema import LossConfig, OptimConfig
from finetune.data.masks import to_latent_grid
from finetune.train import train
from finetune.training.checks import check_config
from finetune.training.losses import debiased_weights, huber_thresholds, min_snr_weights, unmask_at_random
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


def test_a_floor_weighs_the_background_and_normalizing_divides_by_the_mean_weight() -> None:
    """OneTrainer's unmasked_weight (every element weighs at least it) and normalize_masked_area_loss
    (each sample's loss over its mean weight; an empty mask stays at 0 with a zero gradient, not NaN)."""
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([50, 700])
    batch = {"text_embeds": torch.zeros(2, 3, 8), "loss_mask": pixel_mask()}
    for floor, normalize in [(0.1, False), (0.0, True), (0.1, True)]:
        prediction = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss_cfg = LossConfig(unmasked_weight=floor, normalize_masked_area=normalize)
        loss = module_with(prediction, loss_cfg).denoising_loss(
            batch, noise=noise, timesteps=timesteps, latents=latents
        )
        loss.backward()
        squared = (prediction.detach() - noise).square()
        weight = to_latent_grid(pixel_mask(), (8, 8)).clamp(min=floor).expand(2, 4, 8, 8)
        per_sample = (squared * weight).mean(dim=(1, 2, 3))
        if normalize:
            area = weight.mean(dim=(1, 2, 3))
            per_sample = per_sample / torch.where(area > 0, area, 1)
        torch.testing.assert_close(loss.detach(), per_sample.mean())
        assert torch.isfinite(prediction.grad).all()
        background = prediction.grad[1]  # sample 1's mask keeps nothing
        assert (background != 0).all() if floor else torch.equal(background, torch.zeros_like(background))


def test_unmasking_at_random_replaces_whole_masks_at_the_asked_rate() -> None:
    masks = torch.zeros(4000, 1, 2, 2)
    masks[:, :, 0, 0] = 0.5
    torch.manual_seed(0)
    drawn = unmask_at_random(masks, 0.3)
    whole = (drawn == 1).flatten(1).all(dim=1)
    assert torch.equal(drawn[~whole], masks[~whole])  # the others are left as they were
    assert 0.27 < whole.float().mean().item() < 0.33
    state = torch.get_rng_state()
    assert torch.equal(unmask_at_random(masks, 1.0), torch.ones_like(masks))
    assert torch.equal(torch.get_rng_state(), state)  # certain: nothing drawn


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


def half_transparent_folder(root: Path) -> Path:
    """Three captioned images whose left halves are transparent (red, green and blue squares)."""
    root.mkdir()
    for name, colour in [("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))]:
        image = Image.new("RGBA", (32, 32), (*colour, 255))
        image.paste((*colour, 0), (0, 0, 16, 32))
        image.save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} square")
    return root


@pytest.fixture(scope="module")
def unmasked_run(tiny_model, tmp_path_factory) -> tuple[Path, list[str]]:
    """Three steps on the half-transparent images without masks: (its run folder, its overrides)."""
    root = tmp_path_factory.mktemp("unmasked")
    overrides = fast_overrides(tiny_model, root / "run", steps=3) + [
        f"data.path={half_transparent_folder(root / 'data')}",
        "data.batch_size=2",
        "validation.every_n_steps=0",
        "validation.prompts=[]",
    ]
    train(compose_config(overrides))
    return root / "run", overrides


@pytest.mark.parametrize("option", ["loss.unmasked_probability=1", "loss.unmasked_weight=1"])
def test_masks_that_an_option_sets_aside_train_exactly_like_no_masks(unmasked_run, tmp_path, option):
    """Every sample trained whole (probability 1), or no element below weight 1: the same losses and the
    same adapter as the run without masks — while plain alpha masks change both."""
    plain_dir, plain = unmasked_run
    masked = ["data.masks=alpha", f"run_dir={tmp_path / 'masked'}"]
    train(compose_config(plain + masked))
    set_aside = [*masked[:1], option, f"run_dir={tmp_path / 'set_aside'}"]
    train(compose_config(plain + set_aside))

    expected = logged_metric(plain_dir, "train/loss")
    assert len(expected) == 3 and logged_metric(tmp_path / "set_aside", "train/loss") == expected
    assert logged_metric(tmp_path / "masked", "train/loss") != expected
    adapter = "adapter/pytorch_lora_weights.safetensors"
    reference = load_file(plain_dir / adapter)
    assert all(torch.equal(t, reference[k]) for k, t in load_file(tmp_path / "set_aside" / adapter).items())
    assert not all(torch.equal(t, reference[k]) for k, t in load_file(tmp_path / "masked" / adapter).items())


@pytest.mark.parametrize(
    "option", ["loss.unmasked_weight=0.1", "loss.unmasked_probability=0.5", "loss.normalize_masked_area=true"]
)
def test_a_masked_training_option_without_masks_is_refused_in_one_line(tmp_path, option) -> None:
    cfg = compose_config(fast_overrides(tmp_path / "never", tmp_path / "run") + [option])
    with pytest.raises(ConfigError) as raised:
        check_config(cfg)
    message = str(raised.value)
    assert (
        message.startswith(f"{option.split('=')[0]}: weighs the loss masks, which are off")
        and "\n" not in message
    )
    check_config(
        compose_config(fast_overrides(tmp_path / "never", tmp_path / "run") + [option, "data.masks=alpha"])
    )
