"""Captioned images as training batches.

A batch: {"pixel_values": [B,3,H,W] in [-1,1], "input_ids": [B,L], "original_size": [B,2] (h, w),
"crop_top_left": [B,2] (top, left), "index": [B] (the record's)}; every image of a batch has the
same (bucket) size.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from finetune.config import DataConfig
from finetune.data.buckets import buckets_for, target_size
from finetune.data.cache import DataCache
from finetune.data.captions import CaptionStyle
from finetune.data.conditioning import ConditioningImages
from finetune.data.dataset import CaptionedImageDataset
from finetune.data.records import ImageRecord, ScanResult, Skipped
from finetune.data.sampler import BucketBatchSampler, ResumableDataLoader
from finetune.data.sources import find_records
from finetune.errors import ConfigError, DataError
from finetune.value_checks import check_values

log = logging.getLogger(__name__)


class CaptionedImageDataModule(L.LightningDataModule):
    """Training batches from `cfg.data`. Call `scan()` early: it reports data errors before models load."""

    def __init__(self, cfg: DataConfig, tokenizer: Any = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer  # set later when it comes with the model
        self.tokenizer_2: Any = None  # SDXL's second tokenizer, likewise
        self.seed = seed
        self.scan_result: ScanResult | None = None
        self.sizes: list[tuple[int, int]] = []
        self.dataset: Any = None  # CaptionedImageDataset, or a StreamingCaptionedImages
        self.cache: DataCache | None = None  # set by prepare_cache()
        self.holdout: list[tuple[ImageRecord, tuple[int, int]]] = []  # (record, size) for validation

    @property
    def records(self) -> Sequence[ImageRecord]:
        if self.scan_result is None:
            self.scan()
        assert self.scan_result is not None
        return self.scan_result.records

    @property
    def num_images(self) -> int:
        """How many usable records the sources hold (scans on first use)."""
        return len(self.records)

    def scan(self) -> int:
        """Check the config, find and screen the records, pick each one's size; return how many.

        A stream is not scanned (it has no end): 0 is returned and rows are checked as they come.
        """
        self._check_config()
        if self.cfg.streaming:
            self._stream().open()  # a wrong name or column fails now, not in a worker after models load
            self.scan_result = ScanResult(records=[], notes=[f"streaming '{self.cfg.name}': counts unknown"])
            return 0
        self.scan_result = find_records(self.cfg)
        self.sizes = [target_size(self.cfg, *record.size) for record in self.scan_result.records]
        self._hold_out()
        return len(self.sizes)

    def _hold_out(self) -> None:
        """Move `data.holdout` records, picked by seed, out of training and into `holdout`."""
        count = self.cfg.holdout
        if count <= 0:
            return
        assert self.scan_result is not None
        total = len(self.sizes)
        if count >= total:
            raise DataError(f"data.holdout: {count} images held out would leave none of {total} to train on")
        chosen = set(random.Random(self.seed).sample(range(total), count))
        records = self.scan_result.records
        self.holdout = [(records[i], self.sizes[i]) for i in sorted(chosen)]
        self.scan_result.records = [r for i, r in enumerate(records) if i not in chosen]
        self.sizes = [s for i, s in enumerate(self.sizes) if i not in chosen]
        self.scan_result.notes.append(
            f"data.holdout: {count} images kept out of training for the validation loss"
        )

    def holdout_dataset(self) -> CaptionedImageDataset | None:
        """The held-out images as they are: centre crop, no flip, captions without dropout or shuffling."""
        if not self.holdout:
            return None
        style = CaptionStyle(prefix=self.cfg.caption_prefix, suffix=self.cfg.caption_suffix)
        records, sizes = zip(*self.holdout, strict=True)
        return CaptionedImageDataset(
            records,
            self.tokenizer,
            sizes,
            captions=style,
            conditioning=ConditioningImages.from_config(self.cfg),
            tokenizer_2=self.tokenizer_2,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.scan_result is None:
            self.scan()
        if self.tokenizer is None:
            raise DataError("the data module has no tokenizer — set datamodule.tokenizer before setup()")
        if self.cfg.streaming:
            self.dataset = self._stream()
            return
        self.dataset = CaptionedImageDataset(
            self.records,
            self.tokenizer,
            self.sizes,
            random_crop=self.cfg.crop == "random",
            random_flip=self.cfg.random_flip,
            captions=CaptionStyle.from_config(self.cfg),
            cache=self.cache,
            conditioning=ConditioningImages.from_config(self.cfg),
            tokenizer_2=self.tokenizer_2,
        )

    def prepare_cache(self, vae: Any, prompts: Any, strategy: Any = None) -> DataCache | None:
        """Plan and fill the cache `data.cache` asks for (ranks share the work); None when it is off.
        `prompts`: the model's `PromptEncoder` (text encoders and tokenizers)."""
        from finetune.data.cache_fill import prepare_cache

        if self.cfg.cache == "none":
            return None
        self.cache = prepare_cache(self, vae, prompts, strategy)
        self.setup("fit")  # the dataset now reads from the cache
        return self.cache

    def drop(self, indices: set[int], reasons: list[Skipped]) -> None:
        """Remove records found unusable after the scan (e.g. by the cache pre-pass), with their reasons."""
        assert self.scan_result is not None
        keep = [i for i in range(len(self.sizes)) if i not in indices]
        self.scan_result.records = [self.scan_result.records[i] for i in keep]
        self.scan_result.skipped += reasons
        self.sizes = [self.sizes[i] for i in keep]

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
        return StreamingCaptionedImages(self.cfg, self.tokenizer, self.seed, rank, world, self.tokenizer_2)

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

    def _check_config(self) -> None:
        cfg = self.cfg
        check_values(cfg, section="data")  # choices and ranges, also when no whole config is around
        if cfg.buckets:
            buckets_for(cfg)  # raises if the bucket settings leave no bucket
        if cfg.holdout and cfg.streaming:
            raise ConfigError("data.holdout: not available with data.streaming — set data.holdout=0")


def _batches_trained(trainer: L.Trainer) -> int:
    """Batches of the current epoch whose training step has run (what a resume must not repeat)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
