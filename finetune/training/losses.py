"""The denoising objective: noise, regression target and per-sample weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from finetune.data.masks import to_latent_grid


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise; with an offset, a per-channel constant shift that lets the model learn
    overall brightness (very dark / very light images) — the "offset noise" trick."""
    noise = torch.randn_like(latents)
    if noise_offset:
        shift = torch.randn(
            latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * shift
    return noise


def regression_target(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the U-Net should output: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type '{prediction_type}'")


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction, so easy low-noise steps stop dominating."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def sample_timesteps(
    count: int,
    num_train_timesteps: int,
    cfg: Any,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training timesteps in [loss.min_timestep, loss.max_timestep): uniform, or logit-normal (a
    sigmoid of a normal draw spread over the range, which puts more steps in its middle)."""
    low = cfg.min_timestep
    high = cfg.max_timestep if cfg.max_timestep is not None else num_train_timesteps
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"timesteps [{low}, {high}) must lie in [0, {num_train_timesteps})")
    if cfg.timestep_sampling == "logit_normal":
        normal = torch.randn(count, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
        return (low + torch.sigmoid(normal) * (high - low)).long().clamp(low, high - 1)
    return torch.randint(low, high, (count,), generator=generator, device=device)


def perturbed_noisy_latents(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    extra: torch.Tensor | None,
    strength: float,
) -> torch.Tensor:
    """The model's input: latents noised with `noise`, plus `strength` times `extra` noise when input
    perturbation is on (Ning et al. 2023). The target stays `noise`: the model learns to look past the
    extra, which narrows the gap between training inputs and its own samples."""
    if strength and extra is not None:
        noise = noise + strength * extra
    return scheduler.add_noise(latents, noise, timesteps)


def huber_thresholds(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, c: float, schedule: str
) -> torch.Tensor:
    """The per-sample threshold of the Huber-like losses: `c`; or exponential in the timestep, from 1
    at t=0 down to `c` at the last; or by the noise level, c + (1 - c) / (1 + sigma)² with sigma =
    sqrt((1 - ᾱ) / ᾱ), large for clean inputs and `c` for pure noise."""
    steps = timesteps.float()
    if schedule == "constant":
        return torch.full_like(steps, c)
    if schedule == "exponential":
        return torch.exp(math.log(c) * steps / scheduler.config.num_train_timesteps)
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigmas = ((1 - alphas) / alphas).sqrt()
    return c + (1 - c) / (1 + sigmas) ** 2


def debiased_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (kohya's `debiased_estimation_loss`): 1/sqrt(SNR), or 1/(SNR + 1) for
    v-prediction, with the SNR capped at 1000 so the cleanest timesteps keep a weight."""
    snr = compute_snr(scheduler, timesteps).clamp(max=1000)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / snr.sqrt()


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    loss_type: str = "l2",
    thresholds: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    per_sample_losses: bool = False,
    *,
    unmasked_weight: float = 0.0,
    normalize_masked_area: bool = False,
) -> torch.Tensor:
    """The mean per-element loss of each sample in float32 (squared error, or the Huber-like ones with
    per-sample `thresholds`), optionally weighted per element by a loss `mask` ([B, 1, H, W] in [0, 1],
    at pixels or on the latent grid; no element weighs less than `unmasked_weight`, and with
    `normalize_masked_area` each sample's loss is divided by its mean weight) and per sample by
    `weights`, then averaged (or each sample's, [B])."""
    difference = prediction.float() - target.float()
    if loss_type == "l2":
        elementwise = difference.square()
    else:
        c = thresholds.float().view(-1, *[1] * (difference.dim() - 1))
        smooth = (difference.square() + c.square()).sqrt() - c
        elementwise = 2 * c * smooth if loss_type == "huber" else 2 * smooth
    if mask is not None:
        # Each latent element weighs the share of its pixels the mask keeps, and the plain mean over all
        # elements follows (as kohya's masked loss does), not a mean over the kept area: an element's
        # weight is its mask value whatever the rest of the mask is, so a small kept region is not blown
        # up (nor an empty mask 0/0), and learning rates tuned with kohya carry over.
        grid = to_latent_grid(mask.float(), difference.shape[-2:])
        if unmasked_weight:
            grid = grid.clamp(min=unmasked_weight)  # OneTrainer's floor: the background trains a little
        elementwise = elementwise * grid
    per_sample = elementwise.mean(dim=tuple(range(1, difference.dim())))
    if mask is not None and normalize_masked_area:
        # The loss per unit of kept area. An empty mask's loss is 0 already; dividing it by 1 instead of
        # 0 keeps its gradient 0 rather than NaN.
        area = grid.mean(dim=tuple(range(1, grid.dim())))
        per_sample = per_sample / torch.where(area > 0, area, torch.ones_like(area))
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample if per_sample_losses else per_sample.mean()


def unmask_at_random(mask: torch.Tensor, probability: float) -> torch.Tensor:
    """OneTrainer's `unmasked_probability`: each sample's mask ([B, 1, H, W]) becomes all ones (the whole
    image trains) with `probability`. At 1 every mask does, without a draw, so the run's other random
    numbers are those of a run without masks."""
    if probability >= 1:
        return torch.ones_like(mask)
    whole = torch.rand(mask.shape[0], device=mask.device) < probability
    return torch.where(whole.view(-1, *[1] * (mask.dim() - 1)), torch.ones_like(mask), mask)
