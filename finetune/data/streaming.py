"""Streaming Hugging Face datasets (`data.source=hf data.streaming=true`): for datasets too big for disk.

Rows are read as they arrive: each rank takes its part of the stream (`split_dataset_by_node`),
DataLoader workers split it further, and a shuffle buffer mixes it. `datasets` hands whole shards
(files) to workers, so a rank with fewer shards than workers (one parquet file, four workers) is
split over ranks x workers instead: each reader keeps every (ranks x workers)-th row. Either way each
row is read once per pass. The stream never ends — it starts over with a new shuffle each pass — so
ranks never run out at different times; `trainer.max_steps` ends the run. Bad rows are skipped with
a warning as they are met, since nothing is scanned ahead.
What streaming cannot do: aspect-ratio buckets, the cache, a data report with counts, and resuming
mid-pass at the exact row (a resumed run starts a fresh pass).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from finetune.config.errors import ConfigError, DataError
from finetune.data.buckets import choose_crop, fit_to
from finetune.data.captions import CaptionStyle
from finetune.data.dataset import TO_TENSOR
from finetune.data.images import ImageDecodeError, decode_value
from finetune.models.prompts import CaptionTokenizer

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000  # rows held for shuffling: more mixes better, costs memory


def check_streaming(cfg: Any, max_steps: int) -> None:
    """Refuse, in one line, the settings a stream cannot honour."""
    if cfg.source != "hf" or cfg.sources:
        raise ConfigError("data.streaming: only a single data.source=hf dataset can be streamed")
    for key, off in (("buckets", False), ("cache", "none")):
        if getattr(cfg, key) != off and not (key == "cache" and cfg.cache == "auto"):  # auto: none
            raise ConfigError(f"data.{key}: not available with data.streaming=true — set data.{key}={off}")
    if max_steps is None or max_steps < 1:
        raise ConfigError("trainer.max_steps: a stream has no length — set how many steps to train")


class StreamingCaptionedImages(IterableDataset):
    """Samples shaped like `CaptionedImageDataset`'s, from a streamed dataset (square crops)."""

    def __init__(self, cfg: Any, tokenizer: Any, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        # The model's tokenizer(s) (a models.prompts.CaptionTokenizer); None only to open and check.
        self.tokenizer = CaptionTokenizer.of(tokenizer) if tokenizer is not None else None
        self.captions = CaptionStyle.from_config(cfg)
        self.skipped = 0
        self.passes: int | None = None  # None: endless; a number ends the stream (to inspect a pass)

    def open(self) -> Any:
        """The whole stream, checked, with images left encoded so they pass our own checks."""
        import datasets

        from finetune.data.hf import load_dataset_args

        try:
            args = load_dataset_args(self.cfg.name, self.cfg.split)
            stream = datasets.load_dataset(*args, split=self.cfg.split, streaming=True)
        except Exception as error:  # datasets raises many kinds (network, format, missing split)
            raise DataError(f"data.name: cannot stream '{self.cfg.name}': {error}") from error
        for key in ("image_column", "caption_column"):
            if getattr(self.cfg, key) not in (stream.column_names or [getattr(self.cfg, key)]):
                raise DataError(f"data.{key}: '{getattr(self.cfg, key)}' not in '{self.cfg.name}'")
        if isinstance((stream.features or {}).get(self.cfg.image_column), datasets.Image):
            stream = stream.cast_column(self.cfg.image_column, datasets.Image(decode=False))
        return stream

    def share(self, worker: Any) -> tuple[Any, bool]:
        """This process's share of the stream, and whether `datasets` may still split it by worker.

        Split by rank, then DataLoader worker. The shuffle seed is the same everywhere, so every reader
        sees the same shard order and buffer shuffle: that is what keeps the shares disjoint.
        """
        from datasets.distributed import split_dataset_by_node

        stream = self.open()
        if self.cfg.shuffle:
            stream = stream.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        by_rank = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        # Enough shards: datasets gives each worker whole ones. (`n_shards`: the name every datasets>=3
        # has; newer ones call it `num_shards` too. Both count this rank's shards after the split.)
        if by_rank.n_shards >= workers:
            return by_rank, True
        readers, reader = self.world_size * workers, self.rank * workers + worker_id
        return split_dataset_by_node(stream, rank=reader, world_size=readers), False

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        share, by_worker = self.share(worker)
        counter = itertools.count()
        for epoch in itertools.count() if self.passes is None else range(self.passes):
            share.set_epoch(epoch)
            # Iterating the dataset in a worker splits it by worker again; `iter()` does not.
            rows = iter(share) if by_worker else _unbatched(share.iter(batch_size=1))
            seen = 0
            for row in rows:
                seen += 1
                sample = self._sample(row, epoch, next(counter), worker.id if worker else 0)
                if sample is not None:
                    yield sample
            if seen == 0:
                if worker is not None and worker.id > 0:  # a tiny stream: worker 0 still feeds this rank
                    log.warning("data.num_workers: worker %d of rank %d got no rows", worker.id, self.rank)
                    return
                raise DataError(
                    f"data.name: '{self.cfg.name}' streamed no rows for rank {self.rank} of {self.world_size}"
                    " — is it empty, or has it fewer rows than ranks x data.num_workers?"
                )

    def _sample(self, row: dict, epoch: int, count: int, worker: int) -> dict[str, torch.Tensor] | None:
        cfg = self.cfg
        key = f"{cfg.name} row {count} (pass {epoch})"
        caption = row.get(cfg.caption_column)
        if caption is None:
            if cfg.missing_caption == "error":
                raise DataError(f"data.missing_caption=error: {key} has no caption")
            if cfg.missing_caption == "skip":
                return self._skip(key, "no caption")
            caption = cfg.default_caption if cfg.missing_caption == "default" else ""
        try:  # data.max_pixels is checked from the header, before any pixel is decoded
            image = decode_value(row.get(cfg.image_column), key, cfg.max_pixels)
        except ImageDecodeError as error:
            return self._skip(key, str(error))
        generator = torch.Generator().manual_seed(hash((self.seed, self.rank, worker, count)) & 0x7FFFFFFF)
        flip = cfg.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        size = (cfg.resolution, cfg.resolution)
        fitted = fit_to(
            image, size, choose_crop(image.width, image.height, size, cfg.crop == "random", generator), flip
        )
        return {
            "pixel_values": TO_TENSOR(fitted.image),
            **self.tokenizer.one(self.captions.apply(" ".join(str(caption).split()), generator)),
            "original_size": torch.tensor(fitted.original_size),
            "crop_top_left": torch.tensor(fitted.crop_top_left),
            "index": torch.tensor(count),
        }

    def _skip(self, key: str, reason: str) -> None:
        self.skipped += 1
        log.warning("skipped %s: %s (%d skipped so far in this process)", key, reason, self.skipped)
        return None


def _unbatched(batches: Iterator[dict[str, list]]) -> Iterator[dict]:
    """Rows out of `IterableDataset.iter` batches (column -> values)."""
    for batch in batches:
        yield from (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))
