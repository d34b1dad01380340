"""Steps with a non-finite loss or gradient: skipped and counted; too many in a row stop the run."""

from __future__ import annotations

import logging

import torch

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)


class NonFiniteError(FinetuneError):
    """Training produced NaN/inf values too many times in a row, or was about to save them."""


class NonFiniteSteps:
    """The count of skipped steps, and the rule that stops a run that keeps producing NaN/inf."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def skip(self, what: str, step: int) -> None:
        self.in_a_row += 1
        self.total += 1
        log.warning("step %d: non-finite %s; the step is skipped (%d skipped so far)", step, what, self.total)
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row had a non-finite {what} (last at step {step}); stopping. "
                "Lower optim.lr, check the data, or train in bf16-mixed / 32-true rather than 16-mixed "
                f"(optim.max_nonfinite_in_a_row={self.limit} sets how many are tolerated)"
            )

    def passed(self) -> None:
        self.in_a_row = 0


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse to write weights holding NaN/inf (`where` says what was about to be written)."""
    bad = [
        name
        for name, value in tensors.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        raise NonFiniteError(f"{where}: {len(bad)} weights hold NaN/inf (e.g. {bad[0]}); nothing was written")
