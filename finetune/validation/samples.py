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
from finetune.models.prompts import PromptEncoder, pipeline_text_inputs
from finetune.models.sharding import runs_sampling
from finetune.validation.clip_score import SampleClipScore
from finetune.validation.prompt_library import SamplePrompt, sample_prompts

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
    prompts: list[SamplePrompt],
    images_per_prompt: int,
    conditions: list[torch.Tensor] | None = None,
    text_side: PromptEncoder | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One row per prompt, `images_per_prompt` columns, each row at its prompt's size, seed, guidance and
    steps (image i of a row uses seed + i) → a [3, H, W] grid in [0, 1] (smaller tiles padded white),
    and each row's samples alone ([n, 3, h, w]).

    With ControlNet `conditions` ([3, H, W] in [0, 1]; prompt i uses condition i, cycling), each row
    starts with its conditioning image. `text_side`: the model's text side as training reads it (clip
    skip, long captions); without it the pipeline encodes the prompts itself.
    """
    rows, samples, count = [], [], images_per_prompt
    schedule = pipe.scheduler
    for number, sample in enumerate(prompts):
        # A prompt's own sampler (a library's --ss) is made from the grid's, so it shares its schedule.
        pipe.scheduler = sampler_from(schedule, sample.sampler) if sample.sampler else schedule
        generators = [torch.Generator(device="cpu").manual_seed(sample.seed + i) for i in range(count)]
        extra, row = {}, []
        if conditions:
            condition = sized(conditions[number % len(conditions)].float().cpu(), sample.height, sample.width)
            extra["image"] = condition[None].repeat(count, 1, 1, 1)
            row.append(condition[None])
        negative = [sample.negative_prompt] * count if sample.negative_prompt else None
        text = {"prompt": [sample.prompt] * count, "negative_prompt": negative}
        if text_side is not None:
            text = pipeline_text_inputs(text_side, [sample.prompt] * count, negative, pipe)
        out = pipe(
            **text,
            num_inference_steps=sample.num_inference_steps,
            guidance_scale=sample.guidance_scale,
            height=sample.height,
            width=sample.width,
            generator=generators,
            output_type="pt",
            **extra,
        )
        samples.append(out.images.float().cpu())
        rows.append(torch.cat([*row, samples[-1]]))
    pipe.scheduler = schedule
    return grid_of(rows, columns=count + (1 if conditions else 0)), samples


def grid_of(rows: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Rows of [n, 3, h, w] tiles (sizes may differ between rows) as one [3, H, W] grid: every tile
    enlarged by one factor and centred on a white tile of the largest size."""
    height = max(row.shape[-2] for row in rows)
    width = max(row.shape[-1] for row in rows)
    factor = max(1, MIN_TILE_SIZE // max(height, width))
    tiles = []
    for row in rows:
        row = enlarge(row, factor)
        top, left = (height * factor - row.shape[-2]) // 2, (width * factor - row.shape[-1]) // 2
        tile = torch.ones(row.shape[0], row.shape[1], height * factor, width * factor)
        tile[..., top : top + row.shape[-2], left : left + row.shape[-1]] = row
        tiles.append(tile)
    return make_grid(torch.cat(tiles), nrow=columns, padding=2, pad_value=1.0)


def sized(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A [3, h, w] conditioning image at (height, width)."""
    if image.shape[-2:] == (height, width):
        return image
    return torch.nn.functional.interpolate(image[None], (height, width), mode="bilinear")[0]


def validation_conditions(
    trainer: L.Trainer, cfg: ValidationConfig, resolution: int, count: int
) -> list[torch.Tensor]:
    """[3, H, W] conditioning images in [0, 1] for ControlNet samples: `validation.conditioning_images`
    (put through the data's preprocessor, e.g. canny, if it has one), else those of the first `count`
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
    return [dataset[(i % len(dataset), 0)]["conditioning_pixel_values"] for i in range(count)]


def enlarge(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, C, H, W] images scaled up by a whole factor, pixels kept sharp."""
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
        self.prompts = sample_prompts(cfg, resolution)  # a bad prompt library fails here, before training

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
        if not runs_sampling(trainer, module) or step == self.last_step or not self.prompts:
            return
        self.last_step = step
        count = self.cfg.images_per_prompt
        with sampling_pipeline(trainer, module, self.cfg.scheduler) as pipe:
            conditions = None
            if module.controlnet is not None:
                conditions = validation_conditions(trainer, self.cfg, self.resolution, len(self.prompts))
            grid, samples = generate_grid(pipe, self.prompts, count, conditions, module.components.prompts)
        self.latest = grid
        if not trainer.is_global_zero:
            return
        path = self._save(grid, step)
        for logger in trainer.loggers:
            log_image(logger, grid, step, caption=" | ".join(p.describe() for p in self.prompts))
        if self.clip_score is not None:
            self._log_clip_score(trainer, module, samples)
        log.info("samples at step %d: %s", step, path)

    def _log_clip_score(
        self, trainer: L.Trainer, module: L.LightningModule, samples: list[torch.Tensor]
    ) -> None:
        """The mean CLIP score of every sample against its prompt (row by row: sizes may differ)."""
        scores = []
        for sample, images in zip(self.prompts, samples, strict=True):
            score = self.clip_score(images.to(module.device), [sample.prompt] * len(images))
            if score is None:
                return
            scores.append(score)
        for logger in trainer.loggers:
            logger.log_metrics({"val/clip_score": sum(scores) / len(scores)}, step=trainer.global_step)

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
