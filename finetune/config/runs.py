"""Which run this is: the run folder's name, from the job's id under SLURM or torchrun."""

from __future__ import annotations

import datetime
import os


def slurm_job_id() -> str | None:
    """The SLURM job's id as `scontrol` names it (`<array job>_<task>` in a job array), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def run_stamp() -> str:
    """The run folder's name: the job's id under SLURM or torchrun, so that every rank (and a
    requeued job) finds the same folder; else the start time."""
    job = slurm_job_id()
    if job:
        return f"slurm-{job}"
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if elastic != "none":
        return f"torchrun-{elastic}"
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
