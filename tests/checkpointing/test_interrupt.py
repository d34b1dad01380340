"""Ctrl-C asks for a checkpoint at the next step; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from finetune.checkpointing.interrupt import StopOnSignal


def test_first_ctrl_c_asks_for_a_checkpoint_and_the_second_stops_at_once(tmp_path: Path) -> None:
    stop = StopOnSignal(tmp_path / "last.ckpt")
    stop._handle(signal.SIGINT, None)
    assert stop.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_repeated_sigterm_keeps_waiting_for_the_step_boundary(tmp_path: Path) -> None:
    stop = StopOnSignal(tmp_path / "last.ckpt")
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # schedulers may repeat it; still one checkpoint, no exception
    assert stop.received == signal.SIGTERM


def test_a_sigterm_after_slurms_requeue_signal_still_requeues(tmp_path: Path) -> None:
    stop = StopOnSignal(tmp_path / "last.ckpt")
    stop._handle(signal.SIGUSR1, None)
    stop._handle(signal.SIGTERM, None)  # SLURM follows up with SIGTERM when it ends the job
    assert stop.requeue and stop.received == signal.SIGTERM
