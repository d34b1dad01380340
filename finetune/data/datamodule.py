"""Captioned images as training batches.

A batch: {"pixel_values": [B,3,H,W] in [-1,1], "input_ids": [B,L], "original_size": [B,2] (h, w),
"crop_top_left": [B,2] (top, left), "index": [B] (the record's)}; every image of a batch has the
same (bucket) size. With `data.masks`, "loss_mask": [B,1,H,W] in [0,1] (on the latent grid when cached).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from finetune.config.errors import DataError
from finetune.config.schema import DataConfig
from finetune.data.cache import DataCache
from finetune.data.conditioning import ConditioningImages
from finetune.data.dataset import CaptionedImageDataset
from finetune.data.masks import LossMasks
from finetune.data.records import ImageRecord, ScanResult, Skipped
from finetune.data.sampler import BucketBatchSampler, ResumableDataLoader
from finetune.data.scan import DataScan, scan_data
from finetune.data.source_settings import source_styles
from finetune.models.prompts import CaptionTokenizer

log = logging.getLogger(__name__)


class CaptionedImageDataModule(L.LightningDataModule):
    """Training batches from `cfg.data`.

    Made after the model loads, with its tokenizer and the scan made before (`scan_data`), so data
    errors surface before any model loads; without a scan it scans on first use.
    """

    def __init__(
        self, cfg: DataConfig, tokenizer: Any = None, seed: int = 0, scan: DataScan | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # The model's tokenizer(s): a CaptionTokenizer, or one Hugging Face tokenizer.
        self.tokenizer = CaptionTokenizer.of(tokenizer) if tokenizer is not None else None
        self.seed = seed
        self._scan = scan
        self.dataset: Any = None  # CaptionedImageDataset, or a StreamingCaptionedImages
        self.cache: DataCache | None = None  # set by prepare_cache()

    @property
    def data(self) -> DataScan:
        """The scan this module trains from (made on first use when none was given)."""
        if self._scan is None:
            self._scan = scan_data(self.cfg, self.seed)
        return self._scan

    def scan(self) -> int:
        """Scan now (if not yet); how many images train."""
        return len(self.data.sizes)

    @property
    def scan_result(self) -> ScanResult:
        return self.data.result

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return self.data.sizes

    @property
    def holdout(self) -> list[tuple[ImageRecord, tuple[int, int]]]:
        return self.data.holdout

    @property
    def records(self) -> Sequence[ImageRecord]:
        return self.data.result.records

    @property
    def num_images(self) -> int:
        """How many usable records the sources hold (scans on first use)."""
        return len(self.records)

    def holdout_dataset(self) -> CaptionedImageDataset | None:
        """The held-out images as they are: centre crop, no flip, captions without dropout or shuffling."""
        if not self.holdout:
            return None
        records, sizes = zip(*self.holdout, strict=True)
        return CaptionedImageDataset(
            records,
            self.tokenizer,
            sizes,
            styles=[style.as_held_out() for style in source_styles(self.cfg)],
            conditioning=ConditioningImages.from_config(self.cfg),
            masks=LossMasks.from_config(self.cfg),  # the validation loss weighs what training does
        )

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise DataError("the data module has no tokenizer — give the model's to CaptionedImageDataModule")
        if self.cfg.streaming:
            self.dataset = self._stream()
            return
        self.dataset = CaptionedImageDataset(
            self.records,
            self.tokenizer,
            self.sizes,
            styles=source_styles(self.cfg),
            cache=self.cache,
            conditioning=ConditioningImages.from_config(self.cfg),
            masks=LossMasks.from_config(self.cfg),
        )

    def prepare_cache(self, vae: Any, prompts: Any, strategy: Any = None) -> DataCache | None:
        """Plan and fill the cache `data.cache` asks for (ranks share the work); None when it is off.
        `prompts`: the model's `PromptEncoder` (text encoders and tokenizers)."""
        from finetune.data.cache_fill import prepare_cache
        from finetune.data.cache_policy import auto_cache_mode

        mode = self.cfg.cache
        if mode == "auto":
            mode, why = auto_cache_mode(self.cfg, self.records, self.sizes, vae, prompts)
            self.scan_result.notes.append(f"data.cache=auto: {mode} — {why}")
            log.info("data.cache=auto: %s — %s", mode, why)
        if mode == "none":
            return None
        self.cache = prepare_cache(self, vae, prompts, strategy, mode)
        self.setup("fit")  # the dataset now reads from the cache
        return self.cache

    def drop(self, indices: set[int], reasons: list[Skipped]) -> None:
        """Remove records found unusable after the scan (e.g. by the cache pre-pass), with their reasons."""
        self.data.drop(indices, reasons)

    def batch_sampler(self) -> BucketBatchSampler:
        """This rank's sampler; follows the trainer's epoch and progress when one is attached."""
        trainer = self.trainer
        size_ids = {size: number for number, size in enumerate(sorted(set(self.sizes)))}
        return BucketBatchSampler(
            [size_ids[size] for size in self.sizes],
            [record.repeats for record in self.records],
            self.cfg.batch_size,
            seed=self.seed,
            shuffle=self.cfg.shuffle,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            epoch_fn=(lambda: trainer.current_epoch) if trainer else None,
            progress_fn=(lambda: (trainer.current_epoch, _batches_trained(trainer))) if trainer else None,
        )

    def _stream(self) -> Any:
        from finetune.data.streaming import StreamingCaptionedImages

        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return StreamingCaptionedImages(self.cfg, self.tokenizer, self.seed, rank, world)

    def train_dataloader(self) -> Any:
        if self.dataset is None:
            self.setup("fit")
        workers = self.cfg.num_workers if self.cfg.num_workers is not None else self._default_workers()
        if self.cfg.streaming:  # the stream shards and shuffles itself
            return DataLoader(
                self.dataset,
                batch_size=self.cfg.batch_size,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=torch.cuda.is_available(),
            )
        # Our sampler shards by rank itself (train.py turns Lightning's DistributedSampler off).
        return ResumableDataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler(),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Its own generator for the workers' base seed: starting an epoch must not draw from the
            # global RNG, whose state a resume restores (samples are seeded one by one anyway).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _default_workers(self) -> int:
        """On a GPU, decoding in the training process would leave the GPU waiting; on the CPU,
        worker processes only compete with training for the same cores."""
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return min(4, (os.cpu_count() or 2) // 2) if on_gpu else 0


def _batches_trained(trainer: L.Trainer) -> int:
    """Batches of the current epoch whose training step has run (what a resume must not repeat)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
