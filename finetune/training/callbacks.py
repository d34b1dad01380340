"""Callbacks: the data cache pre-pass and report, moving models for a block, a whole-run progress bar."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


class DataCachePass(L.Callback):
    """Before training (models on their device, ranks started): fill the data cache.

    When both latents and text features come from the cache, the VAE and text encoder move off
    the accelerator: training no longer needs them, and sampling borrows them back (`on_device`).
    """

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "prepare_cache"):
            return
        cache = datamodule.prepare_cache(module.vae, module.components.prompts, trainer.strategy)
        if cache is not None and cache.text_keys is not None and module.device.type != "cpu":
            for model in (module.vae, *module.components.text_encoders):
                model.to("cpu")
            log.info("data.cache: everything is cached; the VAE and text encoders wait on the CPU")


class DataReport(L.Callback):
    """When training starts, once the data is final (after the cache pre-pass, which drops images
    that fail to decode): print the data report, write it to `path`, give its counts to the loggers."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from finetune.data.report import build_report, format_report, write_report
        from finetune.data.source_settings import regularisation_sources

        datamodule = trainer.datamodule
        if not trainer.is_global_zero or datamodule is None:
            return
        if datamodule.cfg.streaming:
            log.info(
                "data report: streaming '%s' — rows are checked as they arrive; no counts",
                datamodule.cfg.name,
            )
            return
        tokenizer = datamodule.tokenizer.tokenizer if datamodule.tokenizer is not None else None
        cfg = datamodule.cfg
        reg = regularisation_sources(cfg)
        report = build_report(datamodule.scan_result, datamodule.sizes, tokenizer, cfg.max_token_length, reg)
        log.info("data report:\n%s", format_report(report, max_files=20))
        write_report(report, self.path)
        counts = {f"data/{key}": report[key] for key in ("images", "skipped", "fixed", "uncaptioned")}
        counts["data/buckets"] = len(report["buckets"])
        for logger in trainer.loggers:
            logger.log_hyperparams(counts)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run (optimizer steps out of `max_steps`), so its ETA is the run's ETA;
    Lightning's default bar restarts every epoch, and epochs are tiny on small datasets."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.max_steps <= 0:
            super().on_train_epoch_start(trainer)
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step
            bar.n = trainer.global_step
            bar.set_description("steps")

    _samples, _since = 0, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, module, *args)
            return
        batch = args[1]
        self._samples += batch["index"].shape[0] * trainer.world_size
        bar = self.train_progress_bar
        if bar.n != trainer.global_step:
            bar.update(trainer.global_step - bar.n)
            now = time.perf_counter()
            metrics = self.get_metrics(trainer, module)
            if self._since:  # samples/s since the previous update (none at the first)
                metrics["samples/s"] = f"{self._samples / (now - self._since):.1f}"
            self._samples, self._since = 0, now
            bar.set_postfix(metrics)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.max_steps <= 0:
            super().on_train_epoch_end(trainer, module)


def in_step_order(callbacks: list[L.Callback]) -> list[L.Callback]:
    """The callbacks in the order their hooks must run, whatever order they were given in.

    At the end of a step: first what changes the weights (the method's EMA update), then what
    measures them (sample grids, validation loss, FID/KID), then what saves them (checkpoints, the
    stop on a signal), so a grid and a checkpoint of step k both see step k's EMA. When training
    starts, the cache pre-pass runs before the data report, which lists what it dropped. Lightning
    itself moves ModelCheckpoint last; this makes the rest of the rule hold too.
    """
    from finetune.checkpointing.checkpoints import StepCheckpoint
    from finetune.checkpointing.interrupt import StopOnSignal
    from finetune.validation.fidelity import HoldoutFidelity
    from finetune.validation.loss import ValidationLoss
    from finetune.validation.samples import SampleGrid

    ranks = ((DataCachePass,), (DataReport,), (), (SampleGrid, ValidationLoss, HoldoutFidelity))
    ranks += ((StepCheckpoint, StopOnSignal),)
    default = 2  # everything else: the method's callbacks, monitors, the progress bar, user callbacks

    def rank(callback: L.Callback) -> int:
        return next((i for i, kinds in enumerate(ranks) if kinds and isinstance(callback, kinds)), default)

    return sorted(callbacks, key=rank)  # stable: the given order within a rank
