"""Moving models between devices for a block of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def on_device(device: torch.device, *models: torch.nn.Module) -> Iterator[None]:
    """Move `models` to `device` for the block, and back where each was afterwards."""
    homes = [next(model.parameters()).device for model in models]
    for model in models:
        model.to(device)
    try:
        yield
    finally:
        for model, home in zip(models, homes, strict=True):
            model.to(home)
