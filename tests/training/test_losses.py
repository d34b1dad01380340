"""The regression target and loss weights match their definitions."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from finetune.training.losses import diffusion_loss, min_snr_weights, regression_target, sample_noise


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
