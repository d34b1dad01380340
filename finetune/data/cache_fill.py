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
from finetune.data.captions import CaptionStyle
from finetune.data.dataset import TO_TENSOR
from finetune.data.images import ImageDecodeError
from finetune.data.records import ImageRecord, Skipped

log = logging.getLogger(__name__)


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
) -> FillResult:
    """Encode what is missing: images in batches of one size, then captions; ranks split the work."""
    result = FillResult()
    latents = cache.missing_latents()[rank::world_size]
    texts = cache.missing_texts()[rank::world_size]
    if not latents and not texts:
        return result
    by_size: dict[tuple[int, int], list[tuple[int, bool]]] = defaultdict(list)
    for index, flip in latents:
        by_size[sizes[index]].append((index, flip))
    bar = tqdm(total=len(latents) + len(texts), desc="caching", disable=rank != 0, unit="entry")
    for jobs in by_size.values():
        for batch in batched(jobs, batch_size):
            pixels, done = [], []
            for index, flip in batch:
                try:
                    image = records[index].load()
                except ImageDecodeError as error:
                    result.failed.append((index, Skipped(records[index].key, str(error))))
                    continue
                entry = cache.latents[index]
                pixels.append(TO_TENSOR(fit_to(image, sizes[index], entry.crop_top_left, flip).image))
                done.append((index, flip))
            if pixels:
                stacked = torch.stack(pixels).to(vae.device, vae.dtype)
                parameters = vae.encode(stacked).latent_dist.parameters
                for (index, flip), params in zip(done, parameters, strict=True):
                    cache.store.put(cache.latents[index].keys[flip], {"latent_dist": params})
            bar.update(len(batch))
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
    bar.close()
    return result


def prepare_cache(datamodule: Any, vae: Any, prompts: Any, strategy: Any = None) -> DataCache:
    """Plan the datamodule's cache, fill it (each rank its share), share the results across ranks.

    Images that fail to decode here are dropped from the datamodule with their reason. Text features
    are cached only when they cannot change: not while the text encoder trains, not with shuffled tags.
    """
    cfg = datamodule.cfg
    captions = CaptionStyle.from_config(cfg)
    trains_text = any(p.requires_grad for model in prompts.models for p in model.parameters())
    cache_text = not cfg.shuffle_tags and not trains_text
    store = CacheStore(cfg.cache, Path(cfg.cache_dir) if cfg.cache_dir else None)
    cache = plan_cache(
        datamodule.records,
        datamodule.sizes,
        store,
        random_crop=cfg.crop == "random",
        random_flip=cfg.random_flip,
        seed=datamodule.seed,
        vae=model_identity(vae),
        vae_dtype=vae.dtype,
        captions=captions,
        text_encoder=prompts.identity(model_identity) if cache_text else None,
        text_dtype=prompts.text_encoder.dtype,
        max_length=datamodule.tokenizer.model_max_length,
    )
    if not cache_text:
        why = "tags are shuffled" if cfg.shuffle_tags else "the text encoder trains"
        cache.notes.append(f"data.cache: text features are not cached because {why}")
    rank, world = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
    to_do = len(cache.missing_latents()) + len(cache.missing_texts())
    result = fill_cache(
        cache,
        datamodule.records,
        datamodule.sizes,
        vae,
        prompts,
        cfg.batch_size,
        rank,
        world,
    )
    failed = result.failed
    if world > 1:
        failed = [item for part in _gather(failed) for item in part]
        if store.directory is None:  # memory: every rank needs every entry
            for entries in _gather(store.entries):
                store.entries.update(entries)
        strategy.barrier()  # disk: every rank's files are written before anyone reads
    cache.computed = to_do
    cache.reused = sum(len(entry.keys) for entry in cache.latents) + len(cache.text_keys or {}) - to_do
    for note in cache.notes:
        log.info(note)
    where = f" (in {store.directory})" if store.directory else ""
    log.info(
        "data.cache=%s: %d entries computed, %d reused%s", cfg.cache, cache.computed, cache.reused, where
    )
    if failed:
        dropped = dict(failed)  # one entry per image, though both its orientations failed
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
