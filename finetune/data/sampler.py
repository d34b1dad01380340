"""The batch sampler: batches from one bucket each, this rank's share, resumable mid-epoch.

Every epoch's batches are a pure function of (seed, epoch): which images (repeats and weights), their
order, and a seed per sample for its random crop, flip and caption changes. So a run resumed from a
checkpoint draws exactly what an uninterrupted one would, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

# A sample as the dataset receives it: (record index, seed for its random choices).
SampleKey = tuple[int, int]


class BucketBatchSampler:
    """Yields lists of `SampleKey`s; all samples of a batch share a bucket.

    `epoch_fn` tells the epoch being iterated (the trainer's, so a resumed run stays in step);
    `progress_fn` tells how many of this rank's batches of that epoch have been trained on, for
    `state_dict()`. Ranks get the same number of batches (DDP steps in lockstep): the epoch's batch
    list is topped up with its own first batches until it divides evenly.
    """

    def __init__(
        self,
        buckets: Sequence[int],
        repeats: Sequence[float],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
        progress_fn: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.repeats = np.asarray(repeats, dtype=np.float64)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch_fn = epoch_fn
        self.progress_fn = progress_fn
        self._epoch = 0  # used when no epoch_fn is given: counts completed iterations
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained) after a restore

    # ----- what an epoch holds --------------------------------------------------------------
    def epoch_samples(self, epoch: int) -> np.ndarray:
        """Record indices shown this epoch: whole repeats always, fractional ones drawn (seeded)."""
        whole = np.floor(self.repeats).astype(np.int64)
        fraction = self.repeats - whole
        extra = np.zeros_like(whole)
        if (total := int(round(fraction.sum()))) > 0:
            rng = np.random.default_rng([self.seed, epoch, 1])
            chosen = rng.choice(len(fraction), size=total, replace=False, p=fraction / fraction.sum())
            extra[chosen] = 1
        return np.repeat(np.arange(len(self.repeats)), whole + extra)

    def epoch_batches(self, epoch: int) -> list[list[SampleKey]]:
        """All ranks' batches of `epoch`, in order, each sample with its own seed."""
        rng = np.random.default_rng([self.seed, epoch])
        samples = self.epoch_samples(epoch)
        if self.shuffle:
            samples = rng.permutation(samples)
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for index in samples.tolist():
            by_bucket[int(self.buckets[index])].append(index)
        batches = [
            members[start : start + self.batch_size]
            for _, members in sorted(by_bucket.items())
            for start in range(0, len(members), self.batch_size)
        ]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if batches and (short := -len(batches) % self.world_size):
            batches += batches[:short]
        seeds = np.random.SeedSequence([self.seed, epoch, 2]).generate_state(
            sum(len(b) for b in batches), dtype=np.uint32
        )
        out, position = [], 0
        for batch in batches:
            out.append([(index, int(seeds[position + i])) for i, index in enumerate(batch)])
            position += len(batch)
        return out

    def rank_batches(self, epoch: int) -> list[list[SampleKey]]:
        return self.epoch_batches(epoch)[self.rank :: self.world_size]

    # ----- iteration ------------------------------------------------------------------------
    def current_epoch(self) -> int:
        return self.epoch_fn() if self.epoch_fn is not None else self._epoch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, skip = self.current_epoch(), 0
        if self._resume is not None:
            (resume_epoch, done), self._resume = self._resume, None
            if done >= len(self.rank_batches(resume_epoch)):
                # Saved after the epoch's last batch. Lightning goes on with the next epoch through
                # this iterator, which a multi-worker loader may start before the epoch count moves.
                epoch = max(epoch, resume_epoch + 1)
            elif resume_epoch == epoch:
                skip = done
        yield from self.rank_batches(epoch)[skip:]
        self._epoch = epoch + 1

    def __len__(self) -> int:
        # Constant across epochs unless fractional repeats move images between buckets.
        epoch = self.current_epoch()
        return len(self.rank_batches(epoch))

    def expected_batches(self) -> int:
        """This rank's batches per epoch, without drawing an epoch (for schedules)."""
        per_bucket: dict[int, float] = defaultdict(float)
        for bucket, repeats in zip(self.buckets.tolist(), self.repeats.tolist(), strict=True):
            per_bucket[bucket] += repeats
        total = sum(math.ceil(round(count) / self.batch_size) for count in per_bucket.values())
        return math.ceil(total / self.world_size)

    # ----- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        if self.progress_fn is None:
            return {"epoch": self._epoch, "batches_done": 0}
        epoch, done = self.progress_fn()
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches_done"]))
        self._epoch = int(state["epoch"])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning saves and restores (it checks for `state_dict` / `load_state_dict`)."""

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.batch_sampler.state_dict()}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state["sampler"])  # type: ignore[union-attr]
