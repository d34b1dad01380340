"""One training sample from a record: decoded, fitted to its bucket, augmented, tokenized.

A sample: {"pixel_values": [3,H,W] in [-1,1], "input_ids": [L] (and "input_ids_2" for SDXL's second
tokenizer), "original_size": [2] (h, w), "crop_top_left": [2] (top, left), "index": the record's}, or
cached latents / text features instead. With `data.masks`, "loss_mask": [1,H,W] in [0,1], placed like
the image; from the cache it is already on the latent grid ([1,h,w]), which is all the loss reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from finetune.config.errors import DataError
from finetune.data.buckets import choose_crop, fit_to
from finetune.data.cache import DataCache
from finetune.data.conditioning import ConditioningImages
from finetune.data.images import ImageDecodeError
from finetune.data.masks import LossMasks, load_with_mask, place
from finetune.data.records import ImageRecord
from finetune.data.sampler import SampleKey
from finetune.data.source_settings import SourceStyle, marks_samples

log = logging.getLogger(__name__)


# How many records in a row may fail to decode before we stop pretending the dataset is usable.
MAX_CONSECUTIVE_BAD = 50
TO_TENSOR = v2.Compose(
    [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
)


class CaptionedImageDataset(Dataset):
    """Decodes, fits (resize, crop, flip) and tokenizes records on access.

    Indexed by `SampleKey` (record index, sample seed) from the batch sampler: the seed drives this
    sample's crop, flip and caption changes, so they do not depend on which worker serves it. A
    record whose image or conditioning image fails to decode is logged and replaced, as a whole
    sample, by the next record of the same size, so one bad file cannot end a long run.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        tokenizer: Any,
        sizes: Sequence[tuple[int, int]],
        styles: Sequence[SourceStyle] = (SourceStyle(),),
        cache: DataCache | None = None,
        conditioning: ConditioningImages | None = None,
        masks: LossMasks | None = None,
    ) -> None:
        self.records, self.sizes = records, sizes
        self.tokenizer = tokenizer  # a models.prompts.CaptionTokenizer
        self.styles = styles  # per source: caption changes, random crop and flip, loss weight
        self.marks = marks_samples(styles)  # samples carry loss_weight and is_reg
        self.cache = cache
        self.conditioning = conditioning
        self.masks = masks
        self._bad: set[int] = set()  # per process: workers each keep their own

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey | int) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        failures = 0
        for current in self._candidates(index):
            try:
                # A fresh generator per try: a substitute is exactly the sample it would be on its own,
                # every part of it (latent, crop, flip, caption, conditioning) from the same record.
                return self._sample(current, torch.Generator().manual_seed(seed))
            except ImageDecodeError as error:
                self._bad.add(current)
                log.warning(
                    "skipped %s at training time, using the next image of its size instead: %s",
                    self.records[current].key,
                    error,
                )
                if (failures := failures + 1) >= MAX_CONSECUTIVE_BAD:
                    break
        width, height = self.sizes[index]
        raise DataError(f"no decodable image of size {width} x {height} left (see warnings) — check the data")

    def _candidates(self, index: int) -> Iterator[int]:
        """`index`, then the records after it (wrapping round) of its size that have not failed."""
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            if current not in self._bad and self.sizes[current] == self.sizes[index]:
                yield current

    def _sample(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Record `index`'s whole sample; raises ImageDecodeError when its image or conditioning fails."""
        if self.cache is not None:
            return self._cached(index, generator)
        record, size = self.records[index], self.sizes[index]
        style = self.styles[record.source]
        image, mask = load_with_mask(record, self.masks)
        flip = style.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        top_left = choose_crop(image.width, image.height, size, style.random_crop, generator)
        fitted = fit_to(image, size, top_left, flip)
        item = {
            "pixel_values": TO_TENSOR(fitted.image),
            **self.tokenize(style.captions.apply(record.caption or "", generator)),
            "original_size": torch.tensor(fitted.original_size),
            "crop_top_left": torch.tensor(fitted.crop_top_left),
            "index": torch.tensor(index),
            **self._marks(style),
        }
        if mask is not None:
            item["loss_mask"] = place(mask, size, top_left, flip)
        if self.conditioning is not None:
            item["conditioning_pixel_values"] = self.conditioning.make(record, fitted, generator)
        return item

    def _cached(self, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The sample from the cache: latent distribution, and text features when those are cached."""
        assert self.cache is not None
        entry, style = self.cache.latents[index], self.styles[self.records[index].source]
        flip = style.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        caption = style.captions.apply(self.records[index].caption or "", generator)
        # The conditioning image first: it may fail to decode, and then nothing need be read from the cache.
        control = self._cached_conditioning(index, flip, generator) if self.conditioning is not None else None
        stored = self.cache.entry(index, flip)
        item = {
            "latent_dist": stored["latent_dist"],
            "original_size": torch.tensor(entry.original_size),
            "crop_top_left": torch.tensor(entry.crop_top_left),
            "index": torch.tensor(index),
            **self._marks(style),
        }
        if self.masks is not None:  # stored beside the latents, with their crop and flip
            item["loss_mask"] = stored["loss_mask"]
        if self.cache.text_keys is not None:
            item.update(self.cache.text(caption))  # text_embeds (and SDXL's pooled_text_embeds)
        else:
            item.update(self.tokenize(caption))
        if control is not None:
            item["conditioning_pixel_values"] = control
        return item

    def _cached_conditioning(self, index: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
        """Record `index`'s conditioning image placed like its cached latents: same crop and flip."""
        assert self.cache is not None and self.conditioning is not None
        record, size, entry = self.records[index], self.sizes[index], self.cache.latents[index]
        if self.conditioning.computed:  # made from the target image: decode it
            fitted = fit_to(record.load(), size, entry.crop_top_left, flip)
            return self.conditioning.make(record, fitted, generator)
        # Read from its own file: the target's pixels are in the cache and its placement is known.
        return self.conditioning.read(record, size, entry.original_size, entry.crop_top_left, flip, generator)

    def _marks(self, style: SourceStyle) -> dict[str, torch.Tensor]:
        """The sample's loss weight and regularisation mark, when sources differ in them."""
        if not self.marks:
            return {}
        return {"loss_weight": torch.tensor(style.loss_weight), "is_reg": torch.tensor(style.is_reg)}

    def tokenize(self, caption: str) -> dict[str, torch.Tensor]:
        return self.tokenizer.one(caption)
