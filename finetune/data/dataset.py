"""One training sample from a record: decoded, fitted to its bucket, augmented, tokenized.

A sample: {"pixel_values": [3,H,W] in [-1,1], "input_ids": [L] (and "input_ids_2" for SDXL's second
tokenizer), "original_size": [2] (h, w), "crop_top_left": [2] (top, left), "index": the record's}, or
cached latents / text features instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from finetune.data.buckets import choose_crop, fit_to
from finetune.data.cache import DataCache
from finetune.data.captions import CaptionStyle, tokenize_captions
from finetune.data.conditioning import ConditioningImages
from finetune.data.images import ImageDecodeError
from finetune.data.records import ImageRecord
from finetune.data.sampler import SampleKey
from finetune.errors import DataError

log = logging.getLogger(__name__)


# How many records in a row may fail to decode before we stop pretending the dataset is usable.
MAX_CONSECUTIVE_BAD = 50
TO_TENSOR = v2.Compose(
    [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
)


class CaptionedImageDataset(Dataset):
    """Decodes, fits (resize, crop, flip) and tokenizes records on access.

    Indexed by `SampleKey` (record index, sample seed) from the batch sampler: the seed drives this
    sample's crop, flip and caption changes, so they do not depend on which worker serves it. An
    image that fails to decode is logged and replaced by the next one of the same size, so one bad
    file cannot end a long run.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        tokenizer: Any,
        sizes: Sequence[tuple[int, int]],
        random_crop: bool = False,
        random_flip: bool = False,
        captions: CaptionStyle | None = None,
        cache: DataCache | None = None,
        conditioning: ConditioningImages | None = None,
        tokenizer_2: Any = None,
    ) -> None:
        self.records, self.sizes = records, sizes
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.random_crop, self.random_flip = random_crop, random_flip
        self.captions = captions or CaptionStyle()
        self.cache = cache
        self.conditioning = conditioning
        self._bad: set[int] = set()  # per process: workers each keep their own

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey | int) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        generator = torch.Generator().manual_seed(seed)
        if self.cache is not None:
            return self._cached(index, generator)
        record, image, index = self._load(index)
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        size = self.sizes[index]
        top_left = choose_crop(image.width, image.height, size, self.random_crop, generator)
        fitted = fit_to(image, size, top_left, flip)
        item = {
            "pixel_values": TO_TENSOR(fitted.image),
            **self.tokenize(self.captions.apply(record.caption or "", generator)),
            "original_size": torch.tensor(fitted.original_size),
            "crop_top_left": torch.tensor(fitted.crop_top_left),
            "index": torch.tensor(index),
        }
        if self.conditioning is not None:
            try:
                item["conditioning_pixel_values"] = self.conditioning.make(record, fitted, generator)
            except ImageDecodeError as error:  # the pair is unusable: serve the next one instead
                self._bad.add(index)
                log.warning("skipped %s at training time: its conditioning image: %s", record.key, error)
                return self[(index, seed)]
        return item

    def _cached(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The sample from the cache: latent distribution, and text features when those are cached."""
        assert self.cache is not None
        entry = self.cache.latents[index]
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        caption = self.captions.apply(self.records[index].caption or "", generator)
        item = {
            "latent_dist": self.cache.latent(index, flip),
            "original_size": torch.tensor(entry.original_size),
            "crop_top_left": torch.tensor(entry.crop_top_left),
            "index": torch.tensor(index),
        }
        if self.cache.text_keys is not None:
            item.update(self.cache.text(caption))  # text_embeds (and SDXL's pooled_text_embeds)
        else:
            item.update(self.tokenize(caption))
        if self.conditioning is not None:  # placed like the cached latents: same crop and flip
            record, image, _ = self._load(index)
            fitted = fit_to(image, self.sizes[index], entry.crop_top_left, flip)
            item["conditioning_pixel_values"] = self.conditioning.make(record, fitted, generator)
        return item

    def _load(self, index: int) -> tuple[ImageRecord, Any, int]:
        size, failures = self.sizes[index], 0
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            if current in self._bad or self.sizes[current] != size:
                continue
            record = self.records[current]
            try:
                return record, record.load(), current
            except ImageDecodeError as error:
                self._bad.add(current)
                log.warning(
                    "skipped %s at training time, using the next image instead: %s", record.key, error
                )
                if (failures := failures + 1) >= MAX_CONSECUTIVE_BAD:
                    break
        raise DataError(
            f"no decodable image of size {size[0]} x {size[1]} left (see warnings) — check the data"
        )

    def tokenize(self, caption: str) -> dict[str, torch.Tensor]:
        return tokenize_one(self.tokenizer, self.tokenizer_2, caption)


def tokenize_one(tokenizer: Any, tokenizer_2: Any, caption: str) -> dict[str, torch.Tensor]:
    """`input_ids` ([L]) of one caption, and `input_ids_2` for SDXL's second tokenizer."""
    return {name: ids[0] for name, ids in tokenize_captions(tokenizer, tokenizer_2, [caption]).items()}
