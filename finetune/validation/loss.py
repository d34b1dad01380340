"""Validation loss on held-out images at fixed timesteps and fixed noise, so steps and runs compare."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from finetune.checkpointing.rng import forked_rng
from finetune.config.errors import ConfigError
from finetune.models.devices import on_device
from finetune.models.sharding import is_sharded

log = logging.getLogger(__name__)


class ValidationLoss(L.Callback):
    """Every `every_n_steps` (and at the start and end): the denoising loss of each `data.holdout`
    image at each of `timesteps`, with noise drawn from `seed` and the image's index, averaged over
    images and timesteps (and ranks) into `val/loss`."""

    def __init__(self, timesteps: list[int], every_n_steps: int, seed: int) -> None:
        self.timesteps = list(timesteps)
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.last_step: int | None = None
        self.latest: float | None = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        limit = module.noise_scheduler.config.num_train_timesteps
        if not all(0 <= t < limit for t in self.timesteps):
            raise ConfigError(f"validation.loss_timesteps: {self.timesteps} must lie in 0..{limit - 1}")
        self._evaluate(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        every = self.every_n_steps
        if every > 0 and trainer.global_step % every == 0:
            self._evaluate(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._evaluate(trainer, module)

    def _evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        dataset = trainer.datamodule.holdout_dataset() if trainer.datamodule else None
        if dataset is None or trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        mean = MeanMetric(sync_on_compute=True).to(module.device)
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            with (
                forked_rng(module.device),  # training's random stream is left as it was
                torch.no_grad(),
                on_device(module.device, module.vae, *module.components.text_encoders),
                trainer.precision_plugin.forward_context(),
                module.method.inference_weights(),  # the weights samples and exports use (EMA)
            ):
                for index, weight in self._share(trainer, len(dataset), is_sharded(module)):
                    mean.update(self._image_loss(module, dataset[(index, 0)], index), weight)
        finally:
            for submodule, training in modes.items():
                submodule.training = training
        self.latest = float(mean.compute())
        # Straight to the loggers: Lightning's self.log is not allowed in on_train_end.
        trainer.callback_metrics["val/loss"] = torch.tensor(self.latest)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"val/loss": self.latest}, step=trainer.global_step)
            log.info("val/loss at step %d: %.5f", trainer.global_step, self.latest)

    def _share(self, trainer: L.Trainer, count: int, sharded: bool) -> list[tuple[int, int]]:
        """(image index, weight) pairs for this rank: every world_size-th image; the metric averages
        over all ranks. With sharded weights each forward pass is a collective, so every rank runs
        as many as the busiest one; the extra passes repeat an image with weight 0."""
        rank, world = trainer.global_rank, trainer.world_size
        share = [(index, len(self.timesteps)) for index in range(rank, count, world)]
        rounds = -(-count // world)
        if sharded and len(share) < rounds:
            share.append((count - 1, 0))
        return share

    def _image_loss(self, module: Any, sample: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        """One image at every timestep, in one batch; its latent is the VAE's mean, not a sample."""
        count = len(self.timesteps)
        batch = {k: v.unsqueeze(0).repeat_interleave(count, 0).to(module.device) for k, v in sample.items()}
        pixels = batch["pixel_values"][:1].to(module.vae.dtype)
        latent = module.vae.encode(pixels).latent_dist.mode() * module.vae.config.scaling_factor
        latents = latent.repeat_interleave(count, 0)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.tensor(self.timesteps, device=module.device)
        return module.denoising_loss(batch, noise=noise, timesteps=timesteps, latents=latents)
