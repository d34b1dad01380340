"""Settings of each source of `data.sources`: its captions, crop, flip, resolution and loss weight,
each falling back to `data.*` where the source leaves it unset (null)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune.config.errors import ConfigError
from finetune.data.captions import CaptionStyle

# What a `data.sources` entry may set for its own images.
PER_SOURCE = (
    "caption_prefix",
    "caption_suffix",
    "keep_tokens",
    "shuffle_tags",
    "caption_dropout",
    "resolution",
    "random_flip",
    "crop",
    "loss_weight",
)
# One line naming the key for a value out of range: (rule, what it must be).
_RANGES = {
    "keep_tokens": (lambda v: v >= 0, "must be 0 or more"),
    "caption_dropout": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "resolution": (lambda v: v >= 1, "must be at least 1"),
    "loss_weight": (lambda v: v >= 0, "must be 0 or more"),
    "repeats": (lambda v: v > 0, "must be greater than 0"),
}


class SourceView:
    """`data.*` as one source sees it: the source's own settings where it sets them, data's elsewhere.
    Reads like a DataConfig (e.g. for `buckets.target_size`)."""

    def __init__(self, data: Any, source: Any = None) -> None:
        self._data = data
        settings = {key: getattr(source, key, None) for key in PER_SOURCE} if source is not None else {}
        self._own = {key: value for key, value in settings.items() if value is not None}

    def __getattr__(self, name: str) -> Any:
        own = self.__dict__.get("_own", {})
        return own[name] if name in own else getattr(self.__dict__["_data"], name)


def source_views(cfg: Any) -> list[SourceView]:
    """One view per source, in `data.sources` order (one for `data` itself when it is the source)."""
    return [SourceView(cfg, source) for source in cfg.sources or []] or [SourceView(cfg)]


@dataclass(frozen=True)
class SourceStyle:
    """How a source's images are shown: caption changes, random crop and flip, the loss weight, and
    whether they are regularisation (class) images. Small and picklable: data workers get it."""

    captions: CaptionStyle = CaptionStyle()
    random_crop: bool = False
    random_flip: bool = False
    loss_weight: float = 1.0
    is_reg: bool = False

    @classmethod
    def of(cls, view: Any, is_reg: bool = False) -> SourceStyle:
        return cls(
            CaptionStyle.from_config(view),
            random_crop=view.crop == "random",
            random_flip=bool(view.random_flip),
            loss_weight=float(view.loss_weight),
            is_reg=is_reg,
        )

    def as_held_out(self) -> SourceStyle:
        """The same source as the validation loss sees it: no random crop, flip or caption change."""
        fixed = CaptionStyle(prefix=self.captions.prefix, suffix=self.captions.suffix)
        return SourceStyle(fixed, loss_weight=self.loss_weight, is_reg=self.is_reg)


def source_styles(cfg: Any) -> list[SourceStyle]:
    """Each source's style, in `data.sources` order (one for `data` itself when it is the source)."""
    sources = list(cfg.sources or [])
    if not sources:
        return [SourceStyle.of(SourceView(cfg))]
    return [SourceStyle.of(SourceView(cfg, source), bool(source.is_reg)) for source in sources]


def regularisation_sources(cfg: Any) -> set[int]:
    """The numbers of the `data.sources` entries marked `is_reg`."""
    return {number for number, source in enumerate(cfg.sources or []) if source.is_reg}


def marks_samples(styles: Sequence[SourceStyle]) -> bool:
    """Whether samples carry their source's loss weight and regularisation mark (else all are alike)."""
    return any(style.loss_weight != 1.0 or style.is_reg for style in styles)


def check_source_settings(cfg: Any) -> None:
    """Each `data.sources` entry's own settings in range: one line naming the key."""
    for number, source in enumerate(cfg.sources or []):
        for key, (rule, must) in _RANGES.items():
            value = getattr(source, key, None)
            if value is not None and not rule(value):
                raise ConfigError(f"data.sources[{number}].{key}: {value} {must}")
