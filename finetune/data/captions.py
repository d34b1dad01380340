"""Caption changes made each time an image is shown: tag shuffling, prefix / suffix, dropout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CaptionStyle:
    prefix: str = ""
    suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0  # leading tags that keep their place when shuffling
    separator: str = ","
    dropout: float = 0.0  # share of samples trained with the empty caption (classifier-free guidance)

    @classmethod
    def from_config(cls, cfg: Any) -> CaptionStyle:
        return cls(
            prefix=cfg.caption_prefix,
            suffix=cfg.caption_suffix,
            shuffle_tags=cfg.shuffle_tags,
            keep_tokens=cfg.keep_tokens,
            separator=cfg.tag_separator,
            dropout=cfg.caption_dropout,
        )

    @property
    def varies(self) -> bool:
        """Whether one image's caption can differ between epochs (then its text cannot be cached)."""
        return self.shuffle_tags or self.dropout > 0

    def apply(self, caption: str, generator: torch.Generator | None = None) -> str:
        """The caption one sample is trained with."""
        # Dropout first, and the empty caption stays empty: the unconditional branch must see nothing.
        if self.dropout > 0 and float(torch.rand((), generator=generator)) < self.dropout:
            return ""
        if self.shuffle_tags:
            caption = self.shuffle(caption, generator)
        return f"{self.prefix}{caption}{self.suffix}"

    def shuffle(self, caption: str, generator: torch.Generator | None = None) -> str:
        tags = [tag.strip() for tag in caption.split(self.separator) if tag.strip()]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        order = torch.randperm(len(rest), generator=generator).tolist()
        joiner = self.separator.strip() + " " if self.separator.strip() else self.separator
        return joiner.join(kept + [rest[i] for i in order])
