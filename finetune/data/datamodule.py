"""Captioned images as training batches: {"pixel_values": [B,3,R,R] in [-1,1], "input_ids": [B,L]}."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from finetune.config import DataConfig
from finetune.data.images import ImageDecodeError
from finetune.data.sources import ImageRecord, Skipped, find_records
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CROPS = ("center", "random")
# How many records in a row may fail to decode before we stop pretending the dataset is usable.
MAX_CONSECUTIVE_BAD = 50


def build_transform(resolution: int, crop: str = "center", random_flip: bool = False) -> v2.Compose:
    """PIL RGB image → float32 [3,R,R] in [-1,1]: shorter side to R, square crop, optional flip."""
    steps: list[Any] = [
        v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(resolution) if crop == "center" else v2.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


class CaptionedImageDataset(Dataset):
    """Decodes, transforms and tokenizes records on access.

    An image that fails to decode at training time is not fatal: it is logged once (per worker) and
    the next record is served in its place, so one bad file cannot end a long run. Random crops,
    flips and caption dropout draw from torch's RNG, which Lightning seeds per worker.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        tokenizer: Any,
        resolution: int,
        crop: str = "center",
        random_flip: bool = False,
        caption_dropout: float = 0.0,
    ) -> None:
        self.records = records
        self.tokenizer = tokenizer
        self.transform = build_transform(resolution, crop, random_flip)
        self.caption_dropout = caption_dropout
        self._bad: set[int] = set()  # per process: workers each keep their own

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for attempt in range(min(len(self), MAX_CONSECUTIVE_BAD)):
            current = (index + attempt) % len(self)
            if current in self._bad:
                continue
            record = self.records[current]
            try:
                image = record.load()
            except ImageDecodeError as error:
                self._bad.add(current)
                log.warning(
                    "skipped %s at training time, using the next image instead: %s", record.key, error
                )
                continue
            return {"pixel_values": self.transform(image), "input_ids": self.tokenize(self._caption(record))}
        raise DataError(
            f"{MAX_CONSECUTIVE_BAD} images in a row could not be decoded (see warnings) — check the data"
        )

    def _caption(self, record: ImageRecord) -> str:
        # Empty captions teach the unconditional branch used by classifier-free guidance.
        if self.caption_dropout > 0 and torch.rand(()).item() < self.caption_dropout:
            return ""
        return record.caption

    def tokenize(self, caption: str) -> torch.Tensor:
        """int64 token ids padded/truncated to the tokenizer's model_max_length."""
        tokens = self.tokenizer(
            caption,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids[0].long()


class CaptionedImageDataModule(L.LightningDataModule):
    """Training batches from `cfg.data`. Call `scan()` early: it reports data errors before models load."""

    def __init__(self, cfg: DataConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer  # set later when it comes with the model
        self.records: Sequence[ImageRecord] | None = None
        self.skipped: list[Skipped] = []
        self.dataset: CaptionedImageDataset | None = None

    @property
    def num_images(self) -> int:
        """How many usable records the source holds (scans on first use)."""
        if self.records is None:
            self.scan()
        assert self.records is not None
        return len(self.records)

    def scan(self) -> int:
        """Check the config, find the records (without decoding images) and return how many there are."""
        self._check_config()
        result = find_records(self.cfg)
        self.records, self.skipped = result.records, result.skipped
        return len(result.records)

    def setup(self, stage: str | None = None) -> None:
        if self.records is None:
            self.scan()
        if self.tokenizer is None:
            raise DataError("the data module has no tokenizer — set datamodule.tokenizer before setup()")
        assert self.records is not None
        self.dataset = CaptionedImageDataset(
            self.records,
            self.tokenizer,
            resolution=self.cfg.resolution,
            crop=self.cfg.crop,
            random_flip=self.cfg.random_flip,
            caption_dropout=self.cfg.caption_dropout,
        )

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        workers = self.cfg.num_workers
        # No sampler here: Lightning swaps in a DistributedSampler itself under DDP.
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            shuffle=self.cfg.shuffle,
            num_workers=workers,
            drop_last=False,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _check_config(self) -> None:
        cfg = self.cfg
        if cfg.crop not in CROPS:
            raise ConfigError(f"data.crop: '{cfg.crop}' is not one of {', '.join(CROPS)}")
        if not 0.0 <= cfg.caption_dropout <= 1.0:
            raise ConfigError(f"data.caption_dropout: {cfg.caption_dropout} is not between 0 and 1")
        for key in ("resolution", "batch_size"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"data.{key}: {getattr(cfg, key)} must be at least 1")
        if cfg.num_workers < 0:
            raise ConfigError(f"data.num_workers: {cfg.num_workers} must be 0 or more")
