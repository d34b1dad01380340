"""`finetune-train`: compose the config with Hydra, then fit with Lightning and export.

    finetune-train model=sd15 model.pretrained=/models/sd15 data=folder data.path=~/my_style

`train(cfg)` is the whole run and is what tests call.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from finetune.config.command_line import expand_home_paths
from finetune.config.errors import run_command
from finetune.config.store import CONF_DIR, register_configs
from finetune.training.checks import check_config

log = logging.getLogger("finetune")
register_configs()


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    global_step: int
    module: Any = None  # the trained DiffusionModule (weights live on it)
    exported: dict[str, Path] = field(default_factory=dict)
    samples: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def train(cfg: DictConfig) -> RunResult:
    """Fit the configured method on the configured data; export on rank 0."""
    check_config(cfg)
    # Heavy imports after the config checks, so config mistakes are reported in a second or two.
    import lightning as L
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from finetune.checkpointing.checkpoints import SafeCheckpointIO, resolve_resume
    from finetune.config.secrets import mask_hydra_files
    from finetune.data import CaptionedImageDataModule
    from finetune.data.scan import scan_data
    from finetune.models.loading import load_components, weight_dtype_for
    from finetune.models.schedules import with_schedule_options
    from finetune.models.sharding import full_weights
    from finetune.models.speed import (
        apply_speed_settings,
        compiles,
        runs_on_cpu,
        set_matmul_precision,
        uses_cuda,
        warn_about_bf16_on_this_cpu,
    )
    from finetune.tiny.builder import ensure_tiny_model
    from finetune.training.callbacks import in_step_order
    from finetune.training.loggers import build_loggers, log_config, log_exports
    from finetune.training.methods import build_method
    from finetune.training.module import DiffusionModule

    # The frozen VAE / text encoder stay in eval mode on purpose; Lightning warns about that.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # A fresh run never starts in a folder with checkpoints (resolve_resume), so this one is a resume.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning's CSV logger appends to the metrics of the run it resumes, whatever this warning says.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    run_dir = Path(cfg.run_dir)
    checkpoint = resolve_resume(cfg.resume, run_dir)  # a wrong path fails here, before models load
    if cfg.prior.path:  # DreamBooth: class images, drawn by the base model where missing
        _prepare_prior(cfg)
    data_scan = scan_data(cfg.data, cfg.seed)  # data errors surface here, before any model loads
    num_images = len(data_scan.sizes)

    L.seed_everything(cfg.seed, workers=True)
    on_cuda = uses_cuda(str(cfg.trainer.accelerator))
    set_matmul_precision(cfg.model, on_cuda)
    precision = str(cfg.trainer.precision)
    if precision.startswith("bf16") and runs_on_cpu(str(cfg.trainer.accelerator)):
        warn_about_bf16_on_this_cpu(f"trainer.precision={precision}", "trainer.precision=32-true")
    dtype = weight_dtype_for(cfg.trainer.precision)
    ensure_tiny_model(cfg.model)
    components = load_components(cfg.model, dtype, allow_unsafe_pickle=bool(cfg.allow_unsafe_pickle))
    components = replace(components, max_token_length=cfg.data.max_token_length)
    if cfg.loss.prediction_type:  # what the U-Net learns is what samples and exports say it predicts
        schedule = with_schedule_options(components.noise_scheduler, cfg.model, cfg.loss.prediction_type)
        components = replace(components, noise_scheduler=schedule)
    method = build_method(cfg.method)
    components = method.prepare(components)
    sharded = str(cfg.trainer.strategy) == "fsdp"
    apply_speed_settings(
        components, cfg.model, compiles(cfg.model.compile, on_cuda, cfg.trainer.max_steps, sharded)
    )
    datamodule = CaptionedImageDataModule(cfg.data, components.prompts.captions, cfg.seed, scan=data_scan)
    module = DiffusionModule(components, method, cfg.loss, cfg.optim)

    loggers = build_loggers(cfg.logger, resuming=checkpoint is not None)
    log_config(loggers, cfg)
    if (run_dir / ".hydra").is_dir() and rank_zero_only.rank == 0:
        mask_hydra_files(run_dir / ".hydra")
    samples = _sample_callback(cfg, run_dir)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["default_root_dir"] = trainer_args["default_root_dir"] or str(run_dir)
    # Our batch sampler gives each rank its share (and resumes mid-epoch); Lightning must not wrap it.
    trainer_args["use_distributed_sampler"] = False
    trainer_args["strategy"] = _strategy(trainer_args.get("strategy"))
    trainer = L.Trainer(
        **trainer_args,
        plugins=[SafeCheckpointIO(allow_unsafe_pickle=bool(cfg.allow_unsafe_pickle))],
        logger=loggers or False,
        callbacks=in_step_order(
            _callbacks(cfg, run_dir) + method.callbacks() + [samples, *_validation_metrics(cfg)]
        ),
    )
    log.info("training %s on %d images from %s", method.summary(), num_images, components.source)
    # weights_only reaches the strategies that load checkpoints without our CheckpointIO (fsdp).
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=not cfg.allow_unsafe_pickle)

    result = RunResult(run_dir, trainer.global_step, module, samples=samples.saved)
    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with full_weights(module):  # trainer=fsdp: every rank helps assemble the weights rank 0 exports
        if trainer.is_global_zero:
            summary = dict(method.summary(), prediction_type=module.prediction_type)
            metadata = _export_metadata(cfg, summary, trainer.global_step, num_images)
            result.exported = _export(method, components, run_dir, metadata, trainer.global_step)
            log_exports(loggers, result.exported, cfg.name, trainer.global_step)
    return result


def _strategy(name: Any) -> Any:
    """Lightning's strategy argument. `fsdp` is this project's FSDP2 strategy (see sharding.py); the
    DeepSpeed ones leave the frozen base out of checkpoints, as every other strategy here does."""
    if name == "fsdp":
        from finetune.models.sharding import ShardedDataParallel

        return ShardedDataParallel()
    if isinstance(name, str) and name.startswith("deepspeed"):
        from lightning.pytorch.strategies import StrategyRegistry

        registered = StrategyRegistry[name]
        return registered["strategy"](**registered["init_params"], exclude_frozen_parameters=True)
    return name


def _prepare_prior(cfg: DictConfig) -> None:
    """Draw the class images `prior.path` lacks, and train them beside the instance images."""
    import torch

    from finetune.data.scan import check_data_config, scan_data
    from finetune.models.loading import weight_dtype_for
    from finetune.models.speed import uses_cuda
    from finetune.tiny.builder import ensure_tiny_model
    from finetune.training.class_images import count_images_missing, ensure_class_images, with_class_images

    with_classes = with_class_images(cfg.data, cfg.prior)
    check_data_config(with_classes)  # the data settings with the class images, before any is drawn
    if cfg.prior.num_images and count_images_missing(cfg.prior):
        scan_data(cfg.data, cfg.seed)  # the instance images are there and usable, before drawing
        ensure_tiny_model(cfg.model)
        device, dtype = "cpu", torch.float32
        if uses_cuda(str(cfg.trainer.accelerator)):
            device, dtype = "cuda", weight_dtype_for(cfg.trainer.precision)
        ensure_class_images(cfg.prior, cfg.model, cfg.data.resolution, cfg.seed, device, dtype)
    cfg.data = with_classes


def _export(method: Any, components: Any, run_dir: Path, metadata: dict[str, str], step: int) -> dict:
    """Export into the run folder; a run resumed after it had exported writes `exports/step_<N>/`
    instead, so no earlier export is ever replaced."""
    from finetune.config.errors import ExportExistsError

    try:
        exported = method.export(components, run_dir, metadata)
    except ExportExistsError:
        root = run_dir / "exports" / f"step_{step:06d}"
        if root.exists():
            log.info("step %d was already exported to %s; nothing new to export", step, root)
            return {}
        root.mkdir(parents=True)
        exported = method.export(components, root, metadata)
    log.info("exported %s", ", ".join(str(p) for p in exported.values()))
    return exported


def _sample_callback(cfg: DictConfig, run_dir: Path):
    from finetune.validation.samples import SampleGrid

    return SampleGrid(cfg.validation, run_dir / "samples", cfg.data.resolution)


def _validation_metrics(cfg: DictConfig) -> list:
    """The validation loss, and FID / KID when Inception weights are given."""
    from finetune.validation.loss import ValidationLoss

    validation = cfg.validation
    metrics = [ValidationLoss(validation.loss_timesteps, validation.every_n_steps, validation.seed)]
    if validation.inception_weights:
        from finetune.validation.fidelity import HoldoutFidelity

        metrics.append(HoldoutFidelity(validation))
    return metrics


def _callbacks(cfg: DictConfig, run_dir: Path) -> list:
    """Checkpoints, LR / throughput monitors, the run progress bar, and user callbacks."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor

    from finetune.checkpointing.checkpoints import StepCheckpoint
    from finetune.checkpointing.interrupt import StopOnSignal
    from finetune.checkpointing.rng import RandomStates
    from finetune.training.callbacks import DataCachePass, DataReport, StepProgressBar

    checkpoints = run_dir / "checkpoints"
    callbacks = [
        DataCachePass(),
        DataReport(run_dir / "data_report.json"),
        RandomStates(),
        StepCheckpoint(
            dirpath=checkpoints,
            filename="step_{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            save_top_k=cfg.checkpoint.keep_last,
            monitor="step",
            mode="max",
            save_last="link",  # last.ckpt: a link to the newest checkpoint, not a second copy
            # A resumed run writes into the same folder: last.ckpt is replaced, not joined by last-v1.ckpt.
            enable_version_counter=False,
        ),
        StopOnSignal(checkpoints / "last.ckpt"),
    ]
    if cfg.trainer.enable_progress_bar is not False:
        callbacks.append(StepProgressBar())
    if cfg.logger:
        callbacks += [
            LearningRateMonitor(logging_interval="step"),
            ThroughputMonitor(
                batch_size_fn=lambda batch: batch["index"].shape[0],
                # samples/s over the last logging interval
                window_size=max(2, cfg.trainer.log_every_n_steps or 50),
                separator="/",
            ),
        ]
    callbacks += [instantiate(node) for node in (cfg.callbacks or {}).values()]
    return callbacks


def _export_metadata(cfg: DictConfig, summary: dict, steps: int, num_images: int) -> dict[str, str]:
    """Training facts for the exported files' safetensors headers (all strings)."""
    from finetune.export.kohya_metadata import finish_time

    return {
        "base_model": str(cfg.model.pretrained),
        **{key: str(value) for key, value in summary.items()},  # method, rank, alpha, prediction_type …
        "steps": str(steps),
        "resolution": str(cfg.data.resolution),
        "clip_skip": str(cfg.model.clip_skip),
        "max_token_length": str(cfg.data.max_token_length or 75),
        "num_train_images": str(num_images),
        "batch_size": str(cfg.data.batch_size),
        "learning_rate": str(cfg.optim.lr),
        "seed": str(cfg.seed),
        "run_name": str(cfg.name),
        "trained_at": finish_time().isoformat(timespec="seconds"),
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    run_command(train, cfg)


def main() -> None:
    sys.argv[1:] = expand_home_paths(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
