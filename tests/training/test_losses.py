"""The regression target and loss weights match their definitions."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from finetune.training.losses import (
    debiased_weights,
    diffusion_loss,
    huber_thresholds,
    min_snr_weights,
    perturbed_noisy_latents,
    regression_target,
    sample_noise,
    sample_timesteps,
)


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_epsilon_target_is_the_noise_and_v_target_is_the_velocity() -> None:
    sched = scheduler()
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(regression_target(sched, latents, noise, t, "epsilon"), noise)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected_v = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(regression_target(sched, latents, noise, t, "v_prediction"), expected_v)


def test_min_snr_weights_clip_easy_timesteps_only() -> None:
    sched = scheduler()
    t = torch.tensor([1, 999])
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    eps_w = min_snr_weights(sched, t, 5.0, "epsilon")
    torch.testing.assert_close(eps_w, torch.clamp(snr, max=5.0) / snr)
    assert eps_w[0] < 1 and torch.isclose(eps_w[1], torch.tensor(1.0))  # low noise down-weighted
    v_w = min_snr_weights(sched, t, 5.0, "v_prediction")
    torch.testing.assert_close(v_w, torch.clamp(snr, max=5.0) / (snr + 1))


def test_noise_offset_shifts_each_channel_by_a_constant() -> None:
    torch.manual_seed(0)
    latents = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(latents)
    torch.manual_seed(0)
    offset = sample_noise(latents, noise_offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-5)  # constant over space
    assert 0.3 < shift[:, :, 0, 0].std() < 0.7


def test_weighted_loss_is_the_weighted_mean_of_per_sample_mse() -> None:
    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert diffusion_loss(pred, target).item() == 2.5
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.0])).item() == 0.5


# --- the loss options users bring from kohya (loss.*) -------------------------------------------------


def test_pseudo_huber_and_smooth_l1_by_hand() -> None:
    # differences 0.3 and 2.0 with c = 0.5: sqrt(0.09 + 0.25) - 0.5 = 0.0830952, sqrt(4.25) - 0.5 = 1.5615528
    pred, target = torch.tensor([[0.3, 2.0]]), torch.zeros(1, 2)
    c = torch.tensor([0.5])
    smooth = [math.sqrt(0.3**2 + 0.25) - 0.5, math.sqrt(2.0**2 + 0.25) - 0.5]
    huber = diffusion_loss(pred, target, loss_type="huber", thresholds=c).item()
    assert huber == pytest.approx(2 * 0.5 * sum(smooth) / 2, rel=1e-6)
    smooth_l1 = diffusion_loss(pred, target, loss_type="smooth_l1", thresholds=c).item()
    assert smooth_l1 == pytest.approx(2 * sum(smooth) / 2, rel=1e-6)
    # near zero the pseudo-Huber is d² (the squared error), far away 2c·|d| (linear): robust to outliers
    small = diffusion_loss(torch.tensor([[1e-2]]), torch.zeros(1, 1), loss_type="huber", thresholds=c).item()
    assert small == pytest.approx(1e-4, rel=1e-2)
    large = diffusion_loss(torch.tensor([[100.0]]), torch.zeros(1, 1), loss_type="huber", thresholds=c).item()
    assert large == pytest.approx(2 * 0.5 * 100, rel=1e-2)


def test_huber_thresholds_by_schedule_by_hand() -> None:
    sched = scheduler()
    t = torch.tensor([0, 500, 1000 - 1])
    assert huber_thresholds(sched, t, 0.1, "constant").tolist() == pytest.approx([0.1] * 3)
    # exponential: c ** (t / T), 1 at t=0 down towards c
    exponential = huber_thresholds(sched, t, 0.1, "exponential").tolist()
    assert exponential == pytest.approx([0.1 ** (s / 1000) for s in (0, 500, 999)], rel=1e-5)
    # snr: c + (1 - c) / (1 + sigma)², sigma = sqrt((1 - abar) / abar)
    abar = sched.alphas_cumprod[t].tolist()
    expected = [0.1 + 0.9 / (1 + math.sqrt((1 - a) / a)) ** 2 for a in abar]
    assert huber_thresholds(sched, t, 0.1, "snr").tolist() == pytest.approx(expected, rel=1e-5)


def test_debiased_estimation_weights_by_hand() -> None:
    sched = scheduler()
    t = torch.tensor([0, 300, 999])
    abar = sched.alphas_cumprod[t].tolist()
    snr = [min(a / (1 - a), 1000.0) for a in abar]  # t=0: SNR ~1176, capped at 1000
    assert snr[0] == 1000.0
    eps = debiased_weights(sched, t, "epsilon").tolist()
    assert eps == pytest.approx([1 / math.sqrt(s) for s in snr], rel=1e-5)
    v = debiased_weights(sched, t, "v_prediction").tolist()
    assert v == pytest.approx([1 / (s + 1) for s in snr], rel=1e-5)


def test_input_perturbation_noises_the_input_more_but_keeps_the_target() -> None:
    sched = scheduler()
    latents, noise, extra = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([100, 700])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    by_hand = abar.sqrt() * latents + (1 - abar).sqrt() * (noise + 0.1 * extra)
    torch.testing.assert_close(perturbed_noisy_latents(sched, latents, noise, t, extra, 0.1), by_hand)
    plain = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    torch.testing.assert_close(perturbed_noisy_latents(sched, latents, noise, t, extra, 0.0), plain)
    # the target is still the unperturbed noise
    assert torch.equal(regression_target(sched, latents, noise, t, "epsilon"), noise)


def test_timesteps_stay_in_their_range_and_logit_normal_favours_the_middle() -> None:
    generator = torch.Generator().manual_seed(0)
    uniform = SimpleNamespace(min_timestep=200, max_timestep=400, timestep_sampling="uniform")
    steps = sample_timesteps(20000, 1000, uniform, generator=generator)
    assert steps.min() == 200 and steps.max() == 399
    logit = SimpleNamespace(
        min_timestep=0, max_timestep=None, timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0
    )
    steps = sample_timesteps(20000, 1000, logit, generator=generator)
    assert 0 <= steps.min() and steps.max() <= 999
    # P(250 <= t < 750) = P(|z| < ln 3) for z ~ N(0, 1) = erf(ln 3 / sqrt 2) = 0.7275 (uniform: 0.5)
    middle = ((steps >= 250) & (steps < 750)).float().mean().item()
    assert middle == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.015)
    with pytest.raises(ValueError, match="must lie in"):
        sample_timesteps(
            4, 1000, SimpleNamespace(min_timestep=0, max_timestep=2000, timestep_sampling="uniform")
        )


def test_the_loss_options_train_together(tiny_model, tmp_path) -> None:
    from conftest import compose_config, fast_overrides

    from finetune.train import train

    options = ["loss.type=huber", "loss.huber_schedule=exponential", "loss.debiased_estimation=true"]
    options += ["loss.input_perturbation=0.1", "loss.timestep_sampling=logit_normal", "loss.min_timestep=100"]
    options += ["loss.max_timestep=900", "validation.every_n_steps=0", "logger=csv"]
    result = train(compose_config(fast_overrides(tiny_model, tmp_path, steps=2) + options))
    assert result.global_step == 2 and math.isfinite(result.metrics["train/loss"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.type=l1", "loss.type"),  # not a choice: fails when the config is composed
        ("loss.huber_c=0", "loss.huber_c: 0.0 must be above 0 and at most 1"),
        ("loss.min_timestep=500", "loss.min_timestep: 500 must be below loss.max_timestep (400)"),
    ],
)
def test_loss_values_are_checked_before_anything_loads(tmp_path, override: str, message: str) -> None:
    from conftest import compose_config

    from finetune.config.values import check_values

    with pytest.raises(Exception, match=re.escape(message)):
        check_values(compose_config([f"run_dir={tmp_path}", "loss.max_timestep=400", override]))
