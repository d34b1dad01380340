"""SIGTERM / SIGINT: finish the optimizer step in progress, save a checkpoint, stop with a message.
Under SLURM, the requeue signal (SIGUSR1) does the same and then requeues the job.

Lightning's own SIGTERM handling stops after the current *batch*, which under gradient accumulation
can be halfway through a step, and saves nothing; its SLURM handler saves from inside the signal
handler, i.e. mid-step, so a run resumed from that file is not the run that was stopped.
Schedulers (SLURM, Kubernetes, spot instances) signal some time before they kill, so the run uses
that time to save what it has.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment

from finetune.checkpointing.checkpoints import StepBoundary
from finetune.config.errors import TrainingInterrupted
from finetune.config.runs import slurm_job_id

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What Lightning's SLURM environment (and `sbatch --signal=SIGUSR1@90`) use to ask for a requeue.
REQUEUE_SIGNAL = signal.SIGUSR1


class StopOnSignal(StepBoundary, Checkpoint):
    """Turns SIGTERM / SIGINT into a checkpoint at the next optimizer-step boundary and a clean stop.

    A second Ctrl-C stops at once, without a checkpoint. Being a `Checkpoint`, Lightning runs it after
    the other callbacks (EMA updates, samples), so the checkpoint sees the step complete.
    """

    def __init__(self, checkpoint_path: Path) -> None:
        self.checkpoint_path = checkpoint_path
        self.received: int | None = None
        self.requeue = False  # SLURM asked for a requeue (REQUEUE_SIGNAL)
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, Any] = {}

    # ----- handlers -------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread set handlers
        self._trainer = trainer
        signals = SIGNALS + ((REQUEUE_SIGNAL,) if SLURMEnvironment.detect() else ())
        # Installed after Lightning's (set at fit start), which they replace for the run.
        self._previous = {signum: signal.signal(signum, self._handle) for signum in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requeue = self.requeue or signum == REQUEUE_SIGNAL  # a later SIGTERM does not undo it
        if self.received is None:
            log.warning(
                "received %s: saving a checkpoint after the current step, then stopping%s",
                signal.Signals(signum).name,
                {signal.SIGINT: " (Ctrl-C again to stop at once)", REQUEUE_SIGNAL: " and requeueing"}.get(
                    signum, ""
                ),
            )
            launcher = self._trainer.strategy.launcher if self._trainer else None
            if launcher is not None:  # ranks Lightning started itself get the news too
                launcher.kill(signum)
        self.received = signum

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # ----- stopping at a step boundary ------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if not self.completed_a_step(trainer):
            return  # mid-accumulation: the step is not finished
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank must stop at the same step (a rank may lack the signal)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if trainer.world_size > 1:  # rank 0 requeues if any rank was asked to
            self.requeue = trainer.strategy.reduce_boolean_decision(self.requeue, all=False)
        trainer.save_checkpoint(self.checkpoint_path)
        signum = self.received or signal.SIGTERM
        if self.requeue:
            self._requeue(trainer)
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}; checkpoint "
            f"saved to {self.checkpoint_path}. Continue with resume=auto and the same run folder "
            f"(hydra.run.dir={self.checkpoint_path.parent.parent})",
            exit_code=128 + int(signum),
        )

    def _requeue(self, trainer: L.Trainer) -> None:
        """Rank 0 asks SLURM to requeue the job; the requeued job continues with resume=auto."""
        job = slurm_job_id()
        if not trainer.is_global_zero or job is None:
            return
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            log.warning("SLURM job %s not requeued: scontrol is not on PATH", job)
            return
        if done.returncode == 0:
            log.warning("requeued SLURM job %s; it continues from %s", job, self.checkpoint_path)
        else:
            log.warning("requeueing SLURM job %s failed (%s): %s", job, done.returncode, done.stderr.strip())
