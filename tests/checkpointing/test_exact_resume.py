"""A run killed at random moments and resumed each time ends bitwise equal to one never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import run_module
from PIL import Image
from safetensors.torch import load_file

STEPS = 10
CHECKPOINT_EVERY = 3
ADAPTER = Path("adapter") / "pytorch_lora_weights.safetensors"


def _dataset(root: Path, count: int = 10) -> Path:
    root.mkdir()
    for i in range(count):
        Image.new("RGB", (48 if i % 2 else 32, 32), (20 * i, 100, 255 - 20 * i)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}, zkz style")
    return root


def _train(
    tiny_model: Path,
    run_dir: Path,
    data: Path,
    loss_log: Path,
    extra: list[str],
    returncode: int,
    context: str = "",
    **env: str,
) -> subprocess.CompletedProcess:
    """One `finetune-train` process with everything that draws random numbers switched on; it must exit
    with `returncode` (else the failure names `context`, e.g. the seed that replays the kill plan)."""
    args = [
        f"model.pretrained={tiny_model}",
        f"hydra.run.dir={run_dir}",
        f"data.path={data}",
        "data.batch_size=2",
        "data.num_workers=2",
        "data.buckets=true",
        "data.bucket_step=8",
        "data.random_flip=true",
        "data.caption_dropout=0.2",
        "method.dropout=0.1",  # LoRA dropout draws from the global RNG
        f"trainer.max_steps={STEPS}",
        "trainer.accelerator=cpu",
        "trainer.accumulate_grad_batches=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "optim.lr=1e-3",
        "optim.scheduler=cosine",
        "optim.warmup_steps=3",
        f"checkpoint.every_n_steps={CHECKPOINT_EVERY}",
        "validation.every_n_steps=4",  # sampling mid-run must not shift the training noise
        "validation.num_inference_steps=2",
        "validation.prompts=[a red circle]",
        "logger=csv",
        "seed=7",
        "+callbacks.loss._target_=helpers.LossLog",
        f"+callbacks.loss.path={loss_log}",
        *extra,
    ]
    return _check_exit(run_module("finetune.train", args, returncode=None, **env), returncode, context)


def _check_exit(
    done: subprocess.CompletedProcess, returncode: int, context: str
) -> subprocess.CompletedProcess:
    assert done.returncode == returncode, (
        f"exit {done.returncode}, expected {returncode}; {context}\n{done.stderr[-3000:]}"
    )
    return done


def _read_log(path: Path) -> dict[tuple[str, ...], set[tuple[str, str]]]:
    """(step, epoch, batch) → every (loss, lr) logged for it; a batch redone after a kill appears twice."""
    seen: dict[tuple[str, ...], set[tuple[str, str]]] = defaultdict(set)
    for line in path.read_text().splitlines():
        step, epoch, batch, loss, lr = line.split()
        seen[(step, epoch, batch)].add((loss, lr))
    return seen


@pytest.fixture(scope="module")
def uninterrupted(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, run folder, loss log) of the run every interrupted one must equal: made once for the module."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = _dataset(root / "data")
    _train(tiny_model, root / "whole", data, root / "whole.log", [], returncode=0)
    return data, root / "whole", root / "whole.log"


def _plan_seed() -> int:
    """FINETUNE_TEST_SEED when set (to replay a failure), else a fresh seed."""
    return int(os.environ.get("FINETUNE_TEST_SEED") or random.randrange(10**6))


def _kill_plan(rng: random.Random) -> list[tuple[int, str]]:
    """Four interruptions at random steps: one during a checkpoint write, one SIGTERM, two SIGKILLs.

    Each strikes at its first chance from its step on, in step order; every run but the last is
    interrupted, since the saves at steps 3 and 6 and the steps up to 8 come after any resume point.
    """
    save_step = rng.choice(range(CHECKPOINT_EVERY, STEPS - CHECKPOINT_EVERY, CHECKPOINT_EVERY))
    others = rng.sample(range(1, STEPS - 1), 3)
    moments = ["mid-accumulation", "after-step", "sigterm"]
    rng.shuffle(moments)
    return sorted([(save_step, "during-save"), *zip(others, moments, strict=True)])


def _assert_same_run(run_dir: Path, log: Path, whole_dir: Path, whole_log: Path, context: str = "") -> None:
    """The resumed run logged the same (loss, LR) for every batch and ended with the same adapter."""
    whole, resumed = _read_log(whole_log), _read_log(log)
    assert all(len(values) == 1 for values in whole.values()), context
    assert resumed.keys() == whole.keys(), context  # same steps, epochs and batches
    # A batch trained twice (before a kill and after the resume) gave the same loss and LR both times.
    assert resumed == whole, context
    final, reference = load_file(run_dir / ADAPTER), load_file(whole_dir / ADAPTER)
    assert final.keys() == reference.keys(), context
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), f"{name} differs; {context}"


def test_the_kill_plan_replays_from_its_seed_and_a_failure_names_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FINETUNE_TEST_SEED", "1234")
    assert _plan_seed() == 1234
    assert _kill_plan(random.Random(_plan_seed())) == _kill_plan(random.Random(1234))
    crashed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="Traceback ...")
    with pytest.raises(AssertionError, match="FINETUNE_TEST_SEED=1234"):
        _check_exit(crashed, 0, "kill plan [...] (FINETUNE_TEST_SEED=1234 repeats it)")


@pytest.mark.slow
def test_killed_and_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(tiny_model, tmp_path, uninterrupted):
    seed = _plan_seed()
    plan = _kill_plan(random.Random(seed))
    context = f"kill plan {plan} (FINETUNE_TEST_SEED={seed} repeats it)"
    print(context)  # pytest shows it with any failure, whichever assertion it is
    data, whole_dir, whole_log = uninterrupted

    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    for step, moment in plan:
        kill = ["resume=auto", "+callbacks.kill._target_=helpers.KillAt"]
        kill += [f"+callbacks.kill.step={step}", f"+callbacks.kill.moment={moment}"]
        expected = 128 + signal.SIGTERM if moment == "sigterm" else -signal.SIGKILL
        done = _train(tiny_model, run_dir, data, log, kill, returncode=expected, context=context)
        if moment == "sigterm":
            # Sent mid-accumulation: the step is finished, saved, and the run says how to go on.
            assert "stopped by SIGTERM" in done.stderr and "resume=auto" in done.stderr, context
            last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
            assert last["global_step"] > step, context
        if moment == "during-save":
            assert list((run_dir / "checkpoints").glob(".*.tmp")), context  # the half-written file
    _train(tiny_model, run_dir, data, log, ["resume=auto"], returncode=0, context=context)

    _assert_same_run(run_dir, log, whole_dir, whole_log, context)
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), context


@pytest.mark.slow
def test_a_slurm_requeue_signal_saves_at_the_step_boundary_requeues_and_resumes_exactly(
    tiny_model, tmp_path, uninterrupted
):
    data, whole_dir, whole_log = uninterrupted

    # One SLURM task, as srun starts it; `scontrol` is a stand-in that records what it was asked.
    bin_dir, asked = tmp_path / "bin", tmp_path / "scontrol.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {asked}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = dict(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="finetune",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
    )
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    requeue = [
        "+callbacks.kill._target_=helpers.KillAt",
        "+callbacks.kill.step=4",
        "+callbacks.kill.moment=requeue",
    ]
    done = _train(tiny_model, run_dir, data, log, requeue, returncode=128 + signal.SIGUSR1, **slurm)
    assert "stopped by SIGUSR1" in done.stderr
    assert asked.read_text().split() == ["requeue", "4242"]
    # Sent mid-accumulation: the checkpoint holds the finished step, not half of the next.
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's mid-step save did not happen

    _train(tiny_model, run_dir, data, log, ["resume=auto"], returncode=0, **slurm)
    _assert_same_run(run_dir, log, whole_dir, whole_log)
