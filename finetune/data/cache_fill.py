"""The cache pre-pass: plan the cache, compute what it lacks (each rank its share), share it across ranks."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from finetune.data.buckets import fit_to
from finetune.data.cache import CacheStore, DataCache, batched, model_identity, plan_cache
from finetune.data.conditioning import ConditioningImages, decode_conditioning
from finetune.data.dataset import TO_TENSOR
from finetune.data.images import ImageDecodeError
from finetune.data.masks import LossMasks, load_with_mask, place, to_latent_grid
from finetune.data.records import ImageRecord, Skipped
from finetune.data.source_settings import source_styles

log = logging.getLogger(__name__)

# data.cache=memory under DDP: every rank needs every entry, as the batch sampler deals records to the
# ranks afresh each epoch. Entries travel in rounds in which each rank sends at most this many bytes of
# tensor data, so the exchange holds about world_size times this in flight per rank however large the
# cache is, instead of every rank's whole share at once.
EXCHANGE_CHUNK_BYTES = 32 * 2**20
# One image orientation to encode: (record index, flipped, pixels, its loss mask at pixels or None).
Job = tuple[int, bool, torch.Tensor, torch.Tensor | None]


@dataclass
class FillResult:
    failed: list[tuple[int, Skipped]] = field(default_factory=list)  # (record index, why)


@torch.no_grad()
def fill_cache(
    cache: DataCache,
    records: Sequence[ImageRecord],
    sizes: Sequence[tuple[int, int]],
    vae: Any,
    prompts: Any,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    check_conditioning: bool = False,
    masks: LossMasks | None = None,
) -> FillResult:
    """Encode what is missing: images in batches of one size, then captions; ranks split the work.

    Ranks split by image, so each image is decoded once, for both its orientations. With
    `check_conditioning` (conditioning images read from files or columns) an image's conditioning
    image is decoded beside it: a broken pair becomes a skip with its reason here, not a substitute
    at training time. With `masks`, each entry holds the image's mask too, placed like the image.
    """
    result = FillResult()
    flips: dict[int, list[bool]] = defaultdict(list)
    for index, flip in cache.missing_latents():
        flips[index].append(flip)
    mine = sorted(flips)[rank::world_size]
    texts = cache.missing_texts()[rank::world_size]
    if not mine and not texts:
        return result
    bar = tqdm(
        total=sum(len(flips[i]) for i in mine) + len(texts), desc="caching", disable=rank != 0, unit="entry"
    )
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in mine:
        by_size[sizes[index]].append(index)
    for indices in by_size.values():
        pending: list[Job] = []  # all of one size
        for index in indices:
            try:
                image, mask = load_with_mask(records[index], masks)
                if check_conditioning and records[index].conditioning is not None:
                    decode_conditioning(records[index])
            except ImageDecodeError as error:
                result.failed.append((index, Skipped(records[index].key, str(error))))
                bar.update(len(flips[index]))
                continue
            for flip in flips[index]:
                top_left = cache.latents[index].crop_top_left
                fitted = fit_to(image, sizes[index], top_left, flip)
                placed = place(mask, sizes[index], top_left, flip) if mask is not None else None
                pending.append((index, flip, TO_TENSOR(fitted.image), placed))
                if len(pending) == batch_size:
                    _encode_latents(cache, vae, pending, bar)
                    pending = []
        if pending:
            _encode_latents(cache, vae, pending, bar)
    _encode_texts(cache, prompts, texts, batch_size, bar)
    bar.close()
    return result


def _encode_latents(cache: DataCache, vae: Any, jobs: list[Job], bar: Any) -> None:
    stacked = torch.stack([pixels for _, _, pixels, _ in jobs]).to(vae.device, vae.dtype)
    parameters = vae.encode(stacked).latent_dist.parameters
    for (index, flip, _, mask), params in zip(jobs, parameters, strict=True):
        entry = {"latent_dist": params}
        if mask is not None:  # stored on the latent grid: the loss reads nothing finer
            entry["loss_mask"] = to_latent_grid(mask[None], params.shape[-2:])[0]
        cache.store.put(cache.latents[index].keys[flip], entry)
    bar.update(len(jobs))


def _encode_texts(cache: DataCache, prompts: Any, texts: list[str], batch_size: int, bar: Any) -> None:
    device = prompts.text_encoder.device
    for batch in batched(texts, batch_size):
        ids = {name: value.to(device) for name, value in prompts.tokenize(batch).items()}
        features = prompts.encode(**ids)
        for i, text in enumerate(batch):
            entry = {"text_embeds": features.hidden[i]}
            if features.pooled is not None:
                entry["pooled_text_embeds"] = features.pooled[i]
            cache.store.put(cache.text_keys[text], entry)  # type: ignore[index]
        bar.update(len(batch))


def prepare_cache(
    datamodule: Any, vae: Any, prompts: Any, strategy: Any = None, mode: str | None = None
) -> DataCache:
    """Plan the datamodule's cache, fill it (each rank its share), share the results across ranks.

    Images that fail to decode here are dropped from the datamodule with their reason. Text features
    are cached only when they cannot change: not while the text encoder trains, not with shuffled tags.
    """
    cfg = datamodule.cfg
    styles = source_styles(cfg)
    trains_text = any(p.requires_grad for model in prompts.models for p in model.parameters())
    shuffled = any(style.captions.shuffle_tags for style in styles)
    cache_text = not shuffled and not trains_text
    mode = mode or cfg.cache  # memory or disk (data.cache=auto has been decided by the caller)
    store = CacheStore(mode, Path(cfg.cache_dir) if cfg.cache_dir else None)
    masks = LossMasks.from_config(cfg)
    cache = plan_cache(
        datamodule.records,
        datamodule.sizes,
        store,
        styles=styles,
        seed=datamodule.seed,
        vae=model_identity(vae),
        vae_dtype=vae.dtype,
        text_encoder=prompts.identity(model_identity) if cache_text else None,
        text_dtype=prompts.text_encoder.dtype,
        max_length=datamodule.tokenizer.length,
        masks=masks,
    )
    if not cache_text:
        why = "tags are shuffled" if shuffled else "the text encoder trains"
        cache.notes.append(f"data.cache: text features are not cached because {why}")
    rank, world = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
    to_do = len(cache.missing_latents()) + len(cache.missing_texts())
    conditioning = ConditioningImages.from_config(cfg)
    result = fill_cache(
        cache,
        datamodule.records,
        datamodule.sizes,
        vae,
        prompts,
        cfg.batch_size,
        rank,
        world,
        check_conditioning=conditioning is not None and not conditioning.computed,
        masks=masks,
    )
    failed = result.failed
    if world > 1:
        failed = [item for part in _gather(failed) for item in part]  # small: a key and reason each
        if store.directory is None:  # memory: every rank needs every entry
            exchange_entries(store.entries)
        strategy.barrier()  # disk: every rank's files are written before anyone reads
    cache.computed = to_do
    cache.reused = sum(len(entry.keys) for entry in cache.latents) + len(cache.text_keys or {}) - to_do
    for note in cache.notes:
        log.info(note)
    where = f" (in {store.directory})" if store.directory else ""
    log.info("data.cache=%s: %d entries computed, %d reused%s", mode, cache.computed, cache.reused, where)
    if failed:
        dropped = dict(failed)  # (index, why): one per image, as one rank decodes each image
        for skipped in dropped.values():
            log.warning("skipped %s while caching: %s", skipped.key, skipped.reason)
        datamodule.drop(set(dropped), list(dropped.values()))
        cache.latents = [entry for i, entry in enumerate(cache.latents) if i not in dropped]
    return cache


def _gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (torch.distributed must be initialised)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def exchange_entries(
    entries: dict[str, dict[str, torch.Tensor]], chunk_bytes: int = EXCHANGE_CHUNK_BYTES
) -> None:
    """Add every other rank's `entries` to this rank's (in place), in rounds: each rank sends whole
    entries of at most `chunk_bytes` of tensors per round (an entry, one latent or one caption's
    features, is far smaller). Every rank calls it; they agree on the number of rounds first."""
    rounds = _rounds(entries, chunk_bytes)
    for number in range(max(_gather(len(rounds)))):
        sent = {key: entries[key] for key in rounds[number]} if number < len(rounds) else {}
        for received in _gather(sent):
            for key, tensors in received.items():
                entries.setdefault(key, tensors)  # two ranks may hold one key (identical images)


def _rounds(entries: dict[str, dict[str, torch.Tensor]], chunk_bytes: int) -> list[list[str]]:
    """This rank's keys, in order, grouped into rounds of at most `chunk_bytes` of tensor data (an
    entry larger than that travels alone)."""
    rounds: list[list[str]] = []
    room = 0
    for key, tensors in entries.items():
        size = sum(tensor.nbytes for tensor in tensors.values())
        if not rounds or size > room:
            rounds.append([])
            room = chunk_bytes
        rounds[-1].append(key)
        room -= size
    return rounds
