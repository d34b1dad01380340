"""Caption changes made each time an image is shown (tag shuffling, prefix/suffix, dropout); tokenizing."""

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


def tokenize_batch(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """[B, model_max_length] int64 token ids, padded and truncated as the text encoder expects."""
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids.long()


def tokenize_captions(tokenizer: Any, tokenizer_2: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    """`input_ids` ([B, L]), and `input_ids_2` from SDXL's second tokenizer when there is one."""
    ids = {"input_ids": tokenize_batch(tokenizer, captions)}
    if tokenizer_2 is not None:
        ids["input_ids_2"] = tokenize_batch(tokenizer_2, captions)
    return ids
