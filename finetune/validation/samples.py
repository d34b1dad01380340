"""Validation samples: a pipeline sharing the live weights, fixed-seed grids, and the callback that
saves them and sends them (and their CLIP score) to the dashboard."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

from finetune.checkpointing.rng import forked_rng
from finetune.config.files import save_png
from finetune.config.schema import Sampler, ValidationConfig
from finetune.models.devices import on_device
from finetune.models.sharding import runs_sampling
from finetune.validation.clip_score import SampleClipScore

log = logging.getLogger(__name__)


# Tiles smaller than this are enlarged (nearest neighbour, whole factors) in grids: a 32-px model's
# samples would otherwise be specks in a dashboard. SD-size samples are left as they are.
MIN_TILE_SIZE = 128

SAMPLERS = {
    Sampler.euler: EulerDiscreteScheduler,
    Sampler.euler_a: EulerAncestralDiscreteScheduler,
    Sampler.ddim: DDIMScheduler,
    Sampler.dpmpp_2m: DPMSolverMultistepScheduler,
}


def sampler_from(noise_scheduler: Any, name: str | None) -> Any:
    """An inference scheduler sharing the training schedule's betas and prediction type."""
    if name is None:
        return noise_scheduler
    return SAMPLERS[Sampler.of(name, "scheduler")].from_config(noise_scheduler.config)


def pipeline_from(module: L.LightningModule, sampler: str | None) -> StableDiffusionPipeline:
    """A pipeline that shares the module's live weights (no copies): SD or SDXL, with the ControlNet
    if one trains."""
    parts = module.components
    pipe = parts.pipeline(sampler_from(parts.noise_scheduler, sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def sampling_pipeline(
    trainer: L.Trainer, module: Any, sampler: str | None
) -> Iterator[StableDiffusionPipeline]:
    """The module's live weights as a pipeline, for a block: eval mode, the weights an export would
    hold (EMA), models on the device, training's precision, and a forked RNG, so that sampling (and
    how often it happens) never shifts the training noise stream."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with (
            forked_rng(module.device),
            on_device(module.device, module.vae, *module.components.text_encoders),
            trainer.precision_plugin.forward_context(),
            module.method.inference_weights(),
        ):
            yield pipeline_from(module, sampler)
    finally:
        for submodule, training in modes.items():
            submodule.training = training


@torch.no_grad()
def generate_grid(
    pipe: StableDiffusionPipeline,
    cfg: ValidationConfig,
    resolution: int,
    conditions: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per prompt, `images_per_prompt` columns, fixed seeds → a [3, H, W] grid in [0, 1], and
    the samples alone ([N, 3, H, W], prompt by prompt).

    With ControlNet `conditions` ([3, H, W] in [0, 1]; prompt i uses condition i, cycling), each row
    starts with its conditioning image.
    """
    images, samples, count = [], [], cfg.images_per_prompt
    for number, prompt in enumerate(cfg.prompts):
        generators = [torch.Generator(device="cpu").manual_seed(cfg.seed + i) for i in range(count)]
        extra = {}
        if conditions:
            condition = conditions[number % len(conditions)].float().cpu()
            extra["image"] = condition[None].repeat(count, 1, 1, 1)
            images.append(condition[None])
        out = pipe(
            [prompt] * count,
            negative_prompt=[cfg.negative_prompt] * count if cfg.negative_prompt else None,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            height=resolution,
            width=resolution,
            generator=generators,
            output_type="pt",
            **extra,
        )
        images.append(out.images.float().cpu())
        samples.append(images[-1])
    columns = count + (1 if conditions else 0)
    return make_grid(enlarge(torch.cat(images)), nrow=columns, padding=2, pad_value=1.0), torch.cat(samples)


def validation_conditions(trainer: L.Trainer, cfg: ValidationConfig, resolution: int) -> list[torch.Tensor]:
    """[3, H, W] conditioning images in [0, 1] for ControlNet samples: `validation.conditioning_images`
    (put through the data's preprocessor, e.g. canny, if it has one), else those of the first
    training samples."""
    from finetune.data.buckets import choose_crop, fit_to
    from finetune.data.conditioning import preprocessor
    from finetune.data.images import open_image

    if cfg.conditioning_images:
        data_cfg, size = trainer.datamodule.cfg, (resolution, resolution)
        conditions = []
        for path in cfg.conditioning_images:
            image = open_image(Path(path).expanduser())
            image = fit_to(image, size, choose_crop(image.width, image.height, size, False), False).image
            if data_cfg.conditioning:
                image = preprocessor(data_cfg.conditioning)(image, data_cfg)
            conditions.append(pil_to_tensor(image).float() / 255)
        return conditions
    dataset = getattr(trainer.datamodule, "dataset", None)
    if dataset is None or not hasattr(dataset, "records") or not len(dataset):
        return []
    return [dataset[(i % len(dataset), 0)]["conditioning_pixel_values"] for i in range(len(cfg.prompts))]


def enlarge(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images scaled up by a whole factor, pixels kept sharp, to reach MIN_TILE_SIZE."""
    factor = MIN_TILE_SIZE // max(images.shape[-2:])
    if factor < 2:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


class SampleGrid(L.Callback):
    """Every `every_n_steps` (and at the start and end), sample the validation prompts with the
    current weights; save the grid under `<run_dir>/samples/` and send it to the loggers."""

    def __init__(self, cfg: ValidationConfig, out_dir: Path, resolution: int) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.resolution = resolution
        self.last_step: int | None = None
        self.saved: list[Path] = []
        self.untrained: torch.Tensor | None = None  # the step-0 grid: the base model's pictures
        self.latest: torch.Tensor | None = None
        self.clip_score = SampleClipScore(cfg.clip_model) if cfg.clip_model else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sample(trainer, module)
        if trainer.global_step == 0:
            self.untrained = self.latest

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        every = self.cfg.every_n_steps
        if every > 0 and trainer.global_step % every == 0:
            self._sample(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sample(trainer, module)
        if self.untrained is not None and trainer.global_step > 0 and trainer.is_global_zero:
            self._before_after(trainer, self.untrained, self.latest)

    def _before_after(self, trainer: L.Trainer, before: torch.Tensor, after: torch.Tensor) -> None:
        """Same prompts and seeds, before training (left) and after (right), in one picture."""
        gap = torch.ones(before.shape[0], before.shape[1], 6)
        grid = torch.cat([before, gap, after], dim=2)
        path = self.out_dir / "before_after.png"
        save_png(to_pil_image(grid), path)
        self.saved.append(path)
        for logger in trainer.loggers:
            log_image(logger, grid, trainer.global_step, "before | after", tag="before_after")

    def _sample(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if not runs_sampling(trainer, module) or step == self.last_step or not self.cfg.prompts:
            return
        self.last_step = step
        with sampling_pipeline(trainer, module, self.cfg.scheduler) as pipe:
            conditions = None
            if module.controlnet is not None:
                conditions = validation_conditions(trainer, self.cfg, self.resolution)
            grid, samples = generate_grid(pipe, self.cfg, self.resolution, conditions)
        self.latest = grid
        if not trainer.is_global_zero:
            return
        path = self._save(grid, step)
        for logger in trainer.loggers:
            log_image(logger, grid, step, caption=" | ".join(self.cfg.prompts))
        if self.clip_score is not None:
            prompts = [prompt for prompt in self.cfg.prompts for _ in range(self.cfg.images_per_prompt)]
            score = self.clip_score(samples.to(module.device), prompts)
            if score is not None:
                for logger in trainer.loggers:
                    logger.log_metrics({"val/clip_score": score}, step=step)
        log.info("samples at step %d: %s", step, path)

    def _save(self, grid: torch.Tensor, step: int) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:06d}.png"
        save_png(to_pil_image(grid), path)
        self.saved.append(path)
        return path


def log_image(logger: Any, grid: torch.Tensor, step: int, caption: str, tag: str = "samples") -> None:
    """Send one image to a logger that can show images (TensorBoard, W&B); others are skipped."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, grid, global_step=step)
        # TensorBoard images carry no caption: the prompts go beside them, in the Text tab.
        logger.experiment.add_text(f"{tag}/caption", caption, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[to_pil_image(grid)], caption=[caption], step=step)
