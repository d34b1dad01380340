"""DiffusionModule: one LightningModule for every method — noise, denoise, loss, optimise."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler

from finetune.config.files import check_finite
from finetune.config.schema import LossConfig, LRSchedule, OptimConfig
from finetune.models.loading import Components
from finetune.models.prompts import TextConditioning, size_conditioning
from finetune.models.sharding import gradient_norm, is_sharded, shard_models
from finetune.training.losses import (
    debiased_weights,
    diffusion_loss,
    huber_thresholds,
    min_snr_weights,
    perturbed_noisy_latents,
    regression_target,
    sample_noise,
    sample_timesteps,
    unmask_at_random,
)
from finetune.training.methods.base import Method
from finetune.training.nonfinite import (
    NonFiniteSteps,
    deepspeed_engine,
    grad_scaler_skips_inf,
    judge_deepspeed_step,
)
from finetune.training.optimizers import build_optimizer, parameter_groups


class DiffusionModule(L.LightningModule):
    """Trains what `method` made trainable on latent-diffusion denoising."""

    # ThroughputMonitor reads this; left unset until FLOPs are measured (MFU needs them).
    flops_per_batch: int | None = None

    def __init__(self, components: Components, method: Method, loss: LossConfig, optim: OptimConfig) -> None:
        super().__init__()
        self.components = components
        self.method = method
        self.loss_cfg = loss
        self.optim_cfg = optim
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2  # SDXL only
        self.controlnet = components.controlnet  # None unless method=controlnet made one
        self.noise_scheduler = components.noise_scheduler
        self.prediction_type = loss.prediction_type or self.noise_scheduler.config.prediction_type
        self.nonfinite = NonFiniteSteps(optim.max_nonfinite_in_a_row)
        self._step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses
        self._trainable: list[torch.nn.Parameter] | None = None
        # Checkpoints hold only what trains; the frozen base comes from `model.pretrained` again.
        self.strict_loading = False
        # diffusers loads models in eval mode; what trains needs train mode (LoRA dropout).
        for trainable in method.trainable_modules(components):
            trainable.train()

    # ----- training -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → scaled VAE latents."""
        latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def encode_text(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
    ) -> TextConditioning:
        return self.components.prompts.encode(input_ids, input_ids_2)

    def batch_latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scaled latents: sampled from cached VAE distribution parameters, or encoded from pixels."""
        if "latent_dist" in batch:
            latents = DiagonalGaussianDistribution(batch["latent_dist"]).sample()
            return latents * self.vae.config.scaling_factor
        return self.encode_images(batch["pixel_values"])

    def batch_text(self, batch: dict[str, torch.Tensor], latents: torch.Tensor) -> TextConditioning:
        """Text-encoder features (cached ones, or computed from token ids), and for SDXL the pooled
        text and image sizes its U-Net also takes."""
        if "text_embeds" in batch:
            text = TextConditioning(batch["text_embeds"], batch.get("pooled_text_embeds"))
        else:
            text = self.encode_text(batch["input_ids"], batch.get("input_ids_2"))
        if self.components.is_sdxl:
            factor = self.components.vae_factor
            target = (latents.shape[-2] * factor, latents.shape[-1] * factor)
            sizes = size_conditioning(
                batch["original_size"], batch["crop_top_left"], target, text.hidden.dtype
            )
            text.added = {"text_embeds": text.pooled, "time_ids": sizes}
        return text

    def denoising_loss(self, batch: dict[str, torch.Tensor], *fixed: Any, **by_name: Any) -> torch.Tensor:
        """The training objective on one batch: `sample_losses` (with its fixed noise, timesteps,
        latents, if given), each weighted by its source, averaged."""
        return source_weighted(self.sample_losses(batch, *fixed, **by_name), batch).mean()

    def sample_losses(
        self,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each sample's loss ([B]), before its source's loss weight; fixed `latents`/`noise`/`timesteps`
        make it comparable across steps and runs (the validation loss)."""
        cfg, scheduler = self.loss_cfg, self.noise_scheduler
        if latents is None:
            latents = self.batch_latents(batch)
        extra = None
        drawn = noise is None  # training draws its noise; the validation loss brings its own, fixed
        if drawn:
            noise = sample_noise(latents, cfg.noise_offset)
            extra = torch.randn_like(noise) if cfg.input_perturbation else None
        if timesteps is None:
            steps = scheduler.config.num_train_timesteps
            timesteps = sample_timesteps(latents.shape[0], steps, cfg, latents.device)
        timesteps = timesteps.long().to(latents.device)
        noisy_latents = perturbed_noisy_latents(
            scheduler, latents, noise, timesteps, extra, cfg.input_perturbation
        )
        text = self.batch_text(batch, latents)
        prediction = self.method.denoise(self.components, noisy_latents, timesteps, text, batch)

        target = regression_target(scheduler, latents, noise, timesteps, self.prediction_type)
        weights = torch.ones(latents.shape[0], device=latents.device)
        if cfg.snr_gamma:
            weights = weights * min_snr_weights(scheduler, timesteps, cfg.snr_gamma, self.prediction_type)
        if cfg.debiased_estimation:
            weights = weights * debiased_weights(scheduler, timesteps, self.prediction_type)
        thresholds = None
        if cfg.type != "l2":
            thresholds = huber_thresholds(scheduler, timesteps, cfg.huber_c, cfg.huber_schedule)
        # With data.masks the batch's loss_mask weighs each element (pixels outside it train nothing,
        # or loss.unmasked_weight); training draws which samples train whole (loss.unmasked_probability).
        mask = batch.get("loss_mask")
        if mask is not None and drawn and cfg.unmasked_probability:
            mask = unmask_at_random(mask, cfg.unmasked_probability)
        return diffusion_loss(
            prediction,
            target,
            weights,
            cfg.type,
            thresholds,
            mask,
            per_sample_losses=True,
            unmasked_weight=cfg.unmasked_weight,
            normalize_masked_area=cfg.normalize_masked_area,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.sample_losses(batch)
        loss = source_weighted(losses, batch).mean()
        # No finiteness check here: it would make the CPU wait for the GPU before every backward.
        # A NaN/inf loss gives NaN/inf gradients, and the step is judged once, before the optimizer.
        self._step_losses.append(loss.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["index"].shape[0])
        if "is_reg" in batch:
            self._log_prior(losses.detach(), batch["is_reg"].bool())
        return loss

    def _log_prior(self, losses: torch.Tensor, is_reg: torch.Tensor) -> None:
        """DreamBooth's two losses apart, before the prior's weight: the class (regularisation) samples'
        (train/prior_loss) and the instance samples' (train/instance_loss), in batches that have them."""
        for name, chosen in (("train/prior_loss", is_reg), ("train/instance_loss", ~is_reg)):
            if chosen.any():  # one host sync per step; only runs with regularisation sources get here
                self.log(name, losses[chosen].mean(), batch_size=int(chosen.sum()))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if deepspeed_engine(self.trainer) is not None:
            return  # DeepSpeed holds the gradients in its partitions and judges the step: optimizer_step
        gradients = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        # Norm before clipping: what the model produced, not what the clipper allowed through.
        total = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros((), device=self.device)
        total = gradient_norm(total)
        losses = self._take_step_losses()
        # One host sync per step. DDP has averaged the gradients, so every rank decides alike.
        loss_ok, norm_ok = torch.stack([torch.isfinite(losses).all(), torch.isfinite(total)]).tolist()
        if loss_ok and (norm_ok or grad_scaler_skips_inf(self.trainer.precision_plugin)):
            # With inf gradients a grad scaler skips the step itself (and lowers its scale).
            self.nonfinite.passed(applied=norm_ok)
            self.log("train/grad_norm", total)
        else:
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients as they are
            self.nonfinite.skip("gradient" if loss_ok else "loss", self.global_step)
        self.log("train/skipped_steps", float(self.nonfinite.total))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        engine = deepspeed_engine(self.trainer)
        boundary = engine is not None and engine.is_gradient_accumulation_boundary()
        super().optimizer_step(*args, **kwargs)
        if boundary:
            self._judge_deepspeed_step(engine)

    def _judge_deepspeed_step(self, engine: Any) -> None:
        norm = judge_deepspeed_step(engine, self._take_step_losses(), self.nonfinite, self.global_step)
        if norm is not None:
            self.log("train/grad_norm", norm)
        self.log("train/skipped_steps", float(self.nonfinite.total))

    def _take_step_losses(self) -> torch.Tensor:
        """This optimizer step's micro-batch losses, and a fresh list for the next step."""
        losses = torch.stack(self._step_losses) if self._step_losses else torch.zeros(1, device=self.device)
        self._step_losses = []
        return losses

    # ----- sharding (trainer=fsdp) ----------------------------------------------------------
    def configure_model(self) -> None:
        """Under `trainer=fsdp`, shard what trains across the ranks (FSDP2); a no-op otherwise."""
        mesh = self._device_mesh  # set only by Lightning's ModelParallelStrategy
        trainable = self.method.trainable_modules(self.components)
        if mesh is None or any(is_sharded(model) for model in trainable):  # Lightning may call it again
            return
        shard_models(trainable, mesh["data_parallel"])
        self._trainable = None  # sharding replaced the parameter objects

    # ----- optimisation ---------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self._trainable is None:  # asked every step: walk the modules once
            modules = self.method.trainable_modules(self.components)
            self._trainable = [p for module in modules for p in module.parameters() if p.requires_grad]
        return self._trainable

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        modules = self.method.trainable_modules(self.components)
        optimizer = build_optimizer(cfg, parameter_groups(modules, self.components.text_encoders, cfg))
        scheduler = get_scheduler(
            # diffusers' "constant" ignores warmup; ours always honours `warmup_steps`.
            "constant_with_warmup" if cfg.scheduler == LRSchedule.constant else str(cfg.scheduler),
            optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=self.trainer.estimated_stepping_batches,
        )
        # `name`: the LR's tag on the dashboard, beside train/loss (Lightning's default is lr-AdamW).
        schedule = {"scheduler": scheduler, "interval": "step", "name": "train/lr"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ----- checkpoints: trainable weights only ---------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        check_finite(checkpoint["state_dict"], "checkpoint")
        checkpoint["nonfinite_steps"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "nonfinite_steps" in checkpoint:  # absent from checkpoints written before it was saved
            self.nonfinite.load_state_dict(checkpoint["nonfinite_steps"])
        if "state_dict" not in checkpoint:  # fsdp / deepspeed: the strategy has loaded the weights itself
            return
        missing = self.trainable_state_keys() - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable weights (e.g. {sorted(missing)[0]}) — "
                "was it written with a different method or method settings?"
            )


def source_weighted(losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's loss times its source's weight (`data.sources[…].loss_weight`, `prior.loss_weight`),
    when the batch carries one."""
    return losses * batch["loss_weight"].to(losses) if "loss_weight" in batch else losses
