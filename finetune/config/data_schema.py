"""Typed schemas of the data group: one source of captioned images, and the data settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.config.choices import Choice


class Source(Choice):
    folder = "folder"
    hf = "hf"


class Crop(Choice):
    center = "center"
    random = "random"


class MissingCaption(Choice):
    skip = "skip"
    empty = "empty"
    default = "default"
    error = "error"


class CacheMode(Choice):
    auto = "auto"  # what trains the same as without: memory under data.cache_budget_gib, disk above
    none = "none"
    memory = "memory"
    disk = "disk"


@dataclass
class SourceConfig:
    """Where captioned images come from: `source=folder` (path) or `source=hf` (name)."""

    source: Source = Source.folder
    path: str | None = None
    name: str | None = None  # hub id, save_to_disk folder, or .parquet / .arrow file(s)
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    # Column of metadata.jsonl / metadata.csv naming each image file (HF imagefolder convention).
    file_column: str = "file_name"
    caption_extensions: list[str] = field(default_factory=lambda: [".txt", ".caption"])
    # ControlNet conditioning images: a parallel folder (same relative names, any image extension), or
    # a metadata / dataset column holding them.
    conditioning_path: str | None = None
    conditioning_column: str | None = None
    # How often this source's images are shown per epoch, relative to their count (may be fractional);
    # it multiplies kohya folder repeats.
    weight: float = 1.0
    # In `data.sources` entries only: settings of this source's images. Unset (null), a setting is
    # data.*'s; the data settings themselves are below, in DataConfig.
    repeats: float | None = None  # kohya's num_repeats: multiplies weight and folder repeats
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens: int | None = None
    shuffle_tags: bool | None = None
    caption_dropout: float | None = None
    default_caption: str | None = None  # the caption of this source's images that have none
    resolution: int | None = None
    random_flip: bool | None = None
    crop: Crop | None = None
    loss_weight: float | None = None  # multiplies the loss of this source's samples
    # Regularisation (DreamBooth class) images: counted apart in the data report, their loss logged apart
    # (train/prior_loss).
    is_reg: bool = False


@dataclass
class DataConfig(SourceConfig):
    """Captioned images: one source (the fields above) or several mixed (`sources`)."""

    sources: list[SourceConfig] = field(default_factory=list)
    repeats: float = 1.0
    loss_weight: float = 1.0
    streaming: bool = False  # hf only: read the dataset as a stream (too big for disk)
    resolution: int = 512
    crop: Crop = Crop.center
    random_flip: bool = True
    # Aspect-ratio buckets: equal-area sizes around `resolution`, each batch from one bucket.
    buckets: bool = False
    bucket_step: int = 64  # side lengths are multiples of this
    bucket_min_side: int | None = None  # null: resolution / 2
    bucket_max_side: int | None = None  # null: resolution * 2
    bucket_max_ratio: float = 4.0  # longest / shortest side
    # Captions
    missing_caption: MissingCaption = MissingCaption.empty
    default_caption: str = ""
    caption_prefix: str = ""  # e.g. a trigger word: "zkz style, "
    caption_suffix: str = ""
    shuffle_tags: bool = False  # shuffle comma-separated tags every time an image is shown
    keep_tokens: int = 0  # leading tags that stay in place when shuffling
    tag_separator: str = ","
    caption_dropout: float = 0.0
    # Tokens a caption may have: 75 (one CLIP window), 150 or 225 (75-token windows joined, as kohya
    # and A1111 read long prompts); longer captions are cut. null: 75.
    max_token_length: int | None = None
    # ControlNet: conditioning computed from each image by a preprocessor (canny), instead of read
    conditioning: str | None = None
    canny_low: int = 100
    canny_high: int = 200
    conditioning_dropout: float = 0.0  # share of samples trained with a blank conditioning image
    # Loss masks (kohya's masked loss): `alpha` (each image's alpha channel) or a folder of greyscale
    # images named like the images; white trains, black is ignored, grey weighs between. null: off.
    masks: str | None = None
    # Bad input
    max_pixels: int = 89_478_485  # larger images are refused (decompression bombs); PIL's own limit
    upscale_small: bool = True  # images smaller than their target size: upscale (noted) or skip
    verify: bool = False  # decode every image while scanning (slower; catches truncated files up front)
    # Caching of VAE latents and text-encoder outputs
    cache: CacheMode = CacheMode.auto
    cache_budget_gib: float = 4.0  # data.cache=auto: in memory up to this size, on disk above it
    cache_dir: str | None = None  # disk cache; null: ~/.cache/finetune/latents
    # Images kept out of training (chosen by seed) for the validation loss (`validation.loss_timesteps`)
    holdout: int = 0
    # Loading
    batch_size: int = 1
    # Decoding processes; null: 4 (at most half the CPUs) when training on a GPU, else 0 (in-process)
    num_workers: int | None = None
    shuffle: bool = True
