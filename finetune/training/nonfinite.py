"""Steps with a non-finite loss or gradient: skipped and counted; too many in a row stop the run."""

from __future__ import annotations

import logging
from typing import Any

import torch

from finetune.config.errors import NonFiniteError

log = logging.getLogger(__name__)


class NonFiniteSteps:
    """The count of skipped steps, and the rule that stops a run that keeps producing NaN/inf.

    `last_skipped` says whether the latest optimizer step left the weights as they were, whoever
    skipped it (we, a grad scaler, DeepSpeed): what follows a step (the EMA) must skip it too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0
        self.last_skipped = False

    def skip(self, what: str, step: int) -> None:
        self.in_a_row += 1
        self.total += 1
        self.last_skipped = True
        log.warning("step %d: non-finite %s; the step is skipped (%d skipped so far)", step, what, self.total)
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row had a non-finite {what} (last at step {step}); stopping. "
                "Lower optim.lr, check the data, or train in bf16-mixed / 32-true rather than 16-mixed "
                f"(optim.max_nonfinite_in_a_row={self.limit} sets how many are tolerated)"
            )

    def passed(self, applied: bool = True) -> None:
        """A step without a NaN/inf of ours; `applied=False` when a grad scaler skipped it anyway."""
        self.in_a_row = 0
        self.last_skipped = not applied

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])


def grad_scaler_skips_inf(precision_plugin: Any) -> bool:
    """Whether the precision plugin has a grad scaler, which skips steps with inf gradients itself
    (16-mixed). `16-true` and the bf16 modes have none: their NaN/inf steps are ours to skip."""
    scaler = getattr(precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


def deepspeed_engine(trainer: Any) -> Any:
    """The DeepSpeed engine when training under a DeepSpeed strategy, else None."""
    strategy = getattr(trainer, "strategy", None)
    return (
        getattr(strategy, "deepspeed_engine", None)
        if type(strategy).__name__ == "DeepSpeedStrategy"
        else None
    )


def judge_deepspeed_step(engine: Any, losses: torch.Tensor, steps: NonFiniteSteps, step: int) -> float | None:
    """Count a finished DeepSpeed step in `steps`; return its global grad norm (None if skipped).

    DeepSpeed keeps gradients in its partitions, out of our sight, but checks them itself: a step whose
    gradients hold NaN/inf is not applied (`was_step_applied`). Under its fp16 loss scaling such a skip
    is the scaler's business, as with 16-mixed, unless the loss itself was NaN/inf.
    """
    loss_ok = bool(torch.isfinite(losses).all())
    if engine.was_step_applied():
        steps.passed()
        norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)
    if loss_ok and engine.fp16_enabled():
        steps.passed(applied=False)
    else:
        steps.skip("gradient" if loss_ok else "loss", step)
    return None
