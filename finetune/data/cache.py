"""Cached VAE latents and text-encoder outputs (`data.cache=memory|disk`).

Encoding an image with the VAE costs more than the U-Net step that uses it, and gives the same result
every epoch. So a pre-pass encodes each image once (both orientations when flips are on; a random
crop is drawn once per image) and each caption once, and training reads the results.

Every entry is keyed by a hash of everything that shaped it: the image's bytes, its target size, crop
and flip, and the identity (weights, config) and dtype of the VAE or text encoder. A changed image,
setting or model therefore never reuses a stale entry; unchanged entries are reused across runs
(disk). Latents are stored as the VAE's distribution parameters (mean and log-variance), so training
still samples a fresh latent each time, as it does without the cache. With `data.masks` an entry also
holds the image's loss mask, placed like the latents and already on their grid (64 times smaller than
at pixels, and all the loss reads); the mask's source is then part of the key, so an entry made
without masks, or from other masks, is never read for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from finetune.config.files import atomic_path
from finetune.data.buckets import choose_crop
from finetune.data.masks import LossMasks
from finetune.data.records import ImageRecord, ImageSource
from finetune.data.source_settings import SourceStyle

# Bump when what an entry holds changes: old entries then stop matching. 2: PNG colour keys (tRNS) are
# transparency, composited on white.
CACHE_VERSION = 2
DEFAULT_CACHE_DIR = Path("~/.cache/finetune/latents")


def model_identity(model: torch.nn.Module) -> str:
    """A hash of a model's class, config and weights: two models share it only if they compute the same."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", {})
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers / diffusers
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # Bytes, not values: a uint8 view works for every dtype, bfloat16 included. Flattened first:
        # a channels-last 1x1 convolution counts as contiguous yet has no unit last stride.
        digest.update(tensor.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def entry_key(**parts: object) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


class CacheStore:
    """Entries by key: in this process's memory, or as safetensors files under a folder."""

    def __init__(self, mode: str, directory: Path | None = None) -> None:
        self.mode = mode
        self.directory = (directory or DEFAULT_CACHE_DIR).expanduser() if mode == "disk" else None
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.entries if self.directory is None else self._path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if self.directory is None:
            return self.entries[key]
        return safetensors.torch.load_file(self._path(key))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if self.directory is None:
            self.entries[key] = tensors
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # another rank or run may read it: never half-written
            safetensors.torch.save_file(tensors, tmp)


class Fingerprints:
    """Content hashes of image files, remembered by (path, size, modification time).

    Hashing every image at every start would read the whole dataset each time; a file whose size
    and modification time are unchanged keeps its hash. Kept beside a disk cache as one JSON file.
    """

    def __init__(self, directory: Path | None) -> None:
        self.path = directory / "fingerprints.json" if directory is not None else None
        self.known: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text())
            except (OSError, ValueError):  # a damaged index only costs re-hashing
                self.known = {}
        self.changed = False

    def of(self, record: ImageRecord) -> str:
        return self.of_source(record.load)

    def of_source(self, source: ImageSource) -> str:
        path = getattr(source, "path", None)
        if path is None:  # a dataset row: hash its bytes
            return source.fingerprint()
        stat = Path(path).stat()
        key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.known:
            self.known[key] = source.fingerprint()
            self.changed = True
        return self.known[key]

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.known))


@dataclass
class LatentEntry:
    """What one image contributes: an entry key per orientation, and the crop the keys were made with."""

    keys: dict[bool, str]  # flipped? -> key
    crop_top_left: tuple[int, int]
    original_size: tuple[int, int]  # (height, width)


@dataclass
class DataCache:
    """The plan (which key holds what) and the store. `text_keys` is None when text is not cached."""

    store: CacheStore
    latents: list[LatentEntry]
    text_keys: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    computed: int = 0  # entries the last fill computed (all ranks)
    reused: int = 0  # entries it found already stored

    def missing_latents(self) -> list[tuple[int, bool]]:
        return [
            (i, flip)
            for i, e in enumerate(self.latents)
            for flip, key in e.keys.items()
            if not self.store.has(key)
        ]

    def missing_texts(self) -> list[str]:
        return [text for text, key in (self.text_keys or {}).items() if not self.store.has(key)]

    def latent(self, index: int, flip: bool) -> torch.Tensor:
        return self.entry(index, flip)["latent_dist"]

    def entry(self, index: int, flip: bool) -> dict[str, torch.Tensor]:
        """One orientation of one image: `latent_dist`, and `loss_mask` when masks were cached with it."""
        return self.store.get(self.latents[index].keys[flip])

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        """`text_embeds`, and for SDXL `pooled_text_embeds`, of one caption."""
        assert self.text_keys is not None
        return dict(self.store.get(self.text_keys[caption]))


def plan_cache(
    records: Sequence[ImageRecord],
    sizes: Sequence[tuple[int, int]],
    store: CacheStore,
    *,
    styles: Sequence[SourceStyle],
    seed: int,
    vae: str,
    vae_dtype: torch.dtype,
    text_encoder: str | None,
    text_dtype: torch.dtype | None = None,
    max_length: int = 77,
    masks: LossMasks | None = None,
) -> DataCache:
    """Keys for every record's latents (and every caption's text features when `text_encoder` is set),
    each placed as its source's style says (`styles[record.source]`: random crop, flip, caption prefix
    and suffix); with `masks`, the latent entries hold the loss masks too."""
    entries = []
    fingerprints = Fingerprints(store.directory)
    for record, size in zip(records, sizes, strict=True):
        fingerprint = fingerprints.of(record)
        assert record.size is not None, "records are screened before caching"
        # One random crop per image, from its content and the run seed: stable across runs.
        generator = torch.Generator().manual_seed(int(fingerprint[:12], 16) ^ seed)
        style = styles[record.source]
        crop = choose_crop(*record.size, size, style.random_crop, generator)
        # Only with masks: keys made without them stay as they were, so existing caches still serve.
        mask = {"mask": masks.identity(record, fingerprints.of_source)} if masks is not None else {}
        keys = {
            flip: entry_key(
                kind="latent",
                image=fingerprint,
                size=size,
                crop=crop,
                flip=flip,
                vae=vae,
                dtype=str(vae_dtype),
                **mask,
            )
            for flip in ((False, True) if style.random_flip else (False,))
        }
        entries.append(LatentEntry(keys, crop, (record.size[1], record.size[0])))
    fingerprints.save()
    cache = DataCache(store, entries)
    if any(style.random_crop for style in styles):
        cache.notes.append("data.cache: random crops are drawn once per image and reused every epoch")
    if text_encoder is not None:
        texts = set()
        for record in records:
            captions = styles[record.source].captions
            texts.add(f"{captions.prefix}{record.caption or ''}{captions.suffix}")
        if any(style.captions.dropout > 0 for style in styles):
            texts.add("")
        cache.text_keys = {
            text: entry_key(
                kind="text", text=text, encoder=text_encoder, dtype=str(text_dtype), max_length=max_length
            )
            for text in sorted(texts)
        }
    return cache


def batched(items: Iterable, size: int) -> Iterable[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
