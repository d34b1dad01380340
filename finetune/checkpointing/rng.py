"""Random states in checkpoints: after a resume, every rank draws the noise, timesteps and dropout
masks an uninterrupted run would have drawn."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def collect_states() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU, and CUDA once in use) random states.

    Only tensors and plain Python values, so the checkpoint still loads with `weights_only=True`
    (numpy's key array would need unpickling numpy, so it travels as a tensor).
    """
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
    }
    # Asking for CUDA states would start CUDA in a run that never uses it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_states(states: dict[str, Any]) -> None:
    """Put back what `collect_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def forked_rng(device: torch.device) -> Any:
    """A block whose random draws (CPU, and `device` if CUDA) leave the training stream as it was."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


class RandomStates(L.Callback):
    """Saves every rank's random states with each checkpoint and puts them back on resume.

    They are saved as the checkpoint is written, right after an optimizer step, and put back just
    before the first batch after the resume, so whatever runs in between (model loading, the data
    cache pre-pass, start-of-run samples) cannot shift the stream. What runs between a save and the
    next batch in an uninterrupted run draws from private generators (sample grids fork the RNG;
    the data loader and dataset have their own), which is what makes the two streams equal.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank and writes rank 0's: gather them all into it.
        local = collect_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["ranks"]
        rank, world = _rank_and_world()
        if len(ranks) != world:
            log.warning(
                "resume: the checkpoint holds random states of %d ranks, this run has %d; "
                "noise and timesteps continue from a fresh seed instead",
                len(ranks),
                world,
            )
            return
        self._pending = ranks[rank]

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if self._pending is not None:
            restore_states(self._pending)
            self._pending = None


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
