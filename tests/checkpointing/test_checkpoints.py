"""Checkpoint files: atomic writes, safe loading, and resume=auto finding the newest complete one."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides

from finetune.checkpointing.checkpoints import SafeCheckpointIO, latest_checkpoint, resolve_resume
from finetune.config.errors import ConfigError
from finetune.config.runs import run_stamp
from finetune.train import train


def test_a_save_interrupted_mid_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_halfway(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_crafted_to_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, path, pickle_module=pickle)
    with pytest.raises(ConfigError, match="allow_unsafe_pickle"):
        SafeCheckpointIO().load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    io, folder = SafeCheckpointIO(), tmp_path / "checkpoints"
    for step in (1, 2):
        io.save_checkpoint({"global_step": step}, folder / f"step_{step}.ckpt")
        os.utime(folder / f"step_{step}.ckpt", (step, step))
    leftover = folder / ".last.ckpt.abc.tmp"
    leftover.write_bytes(b"partial")  # an interrupted save's temp file
    (folder / "broken.ckpt").write_bytes(b"not a checkpoint")  # newest, but not complete
    assert latest_checkpoint(tmp_path) == folder / "step_2.ckpt"
    assert not leftover.exists()
    # Lightning's SLURM requeue checkpoint lies in the run folder itself, and counts when newer.
    io.save_checkpoint({"global_step": 3}, tmp_path / "hpc_ckpt_1.ckpt")
    assert latest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.slow
def test_resume_auto_continues_a_crashed_run_in_its_own_folder(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    overrides = fast_overrides(tiny_model, run_dir, steps=4) + ["resume=auto"]

    def seen(name: str) -> list[str]:
        return ["+callbacks.seen._target_=helpers.SeenSamples", f"+callbacks.seen.out_dir={tmp_path / name}"]

    crash = ["+callbacks.crash._target_=helpers.CrashAtStep", "+callbacks.crash.step=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_config(overrides + crash + seen("first")))  # nothing to resume yet: from step 0
    resumed = train(compose_config(overrides + seen("second")))
    assert resumed.global_step == 4
    batches = [len((tmp_path / name / "rank0.txt").read_text().splitlines()) for name in ("first", "second")]
    assert batches == [2, 2]  # the second run trained only the steps the first had not
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_000002.ckpt",
        "step_000004.ckpt",
    ]
    adapter = run_dir / "adapter" / "pytorch_lora_weights.safetensors"
    exported = adapter.read_bytes()

    # Resumed once more, for more steps: the first export stays; the new one goes beside it.
    longer = overrides + ["trainer.max_steps=5"] + seen("third")
    assert train(compose_config(longer)).global_step == 5
    assert adapter.read_bytes() == exported
    assert (run_dir / "exports" / "step_000005" / "adapter" / adapter.name).is_file()
    # Resuming a finished run trains nothing and exports nothing again.
    again = train(compose_config(longer))
    assert again.global_step == 5 and again.exported == {}


def test_keep_last_removes_old_checkpoints_only_once_a_newer_one_is_complete(tiny_model, tmp_path):
    audit = tmp_path / "removals.txt"
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=4) + [
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=2",
        "validation.every_n_steps=0",
        "+callbacks.audit._target_=helpers.RemovalAudit",
        f"+callbacks.audit.out={audit}",
    ]
    train(compose_config(overrides))
    removals = [line.split() for line in audit.read_text().splitlines()]
    assert [r[0] for r in removals] == ["step_000001.ckpt", "step_000002.ckpt"]
    for removed, *present in removals:
        newer = [name for name in present if name.startswith("step_") and name > removed]
        assert len(newer) >= 2, (removed, present)  # the two to keep were complete when it went
    folder = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["last.ckpt", "step_000003.ckpt", "step_000004.ckpt"]
    # last.ckpt is the newest checkpoint under a second name, not a second copy of its bytes.
    assert (folder / "last.ckpt").samefile(folder / "step_000004.ckpt")
    assert (folder / "step_000004.ckpt").stat().st_nlink == 2


def test_last_never_dangles_and_a_dangling_link_is_not_a_resume_candidate(tmp_path):
    from finetune.checkpointing.checkpoints import StepCheckpoint

    class Trainer:
        is_global_zero = True

    folder = tmp_path / "checkpoints"
    io = SafeCheckpointIO()
    for step in (1, 2):
        io.save_checkpoint({"global_step": step}, folder / f"step_00000{step}.ckpt")
        StepCheckpoint._link_checkpoint(
            Trainer(), str(folder / f"step_00000{step}.ckpt"), str(folder / "last.ckpt")
        )
    StepCheckpoint._link_checkpoint(Trainer(), str(folder / "step_000002.ckpt"), str(folder / "last.ckpt"))
    (folder / "step_000002.ckpt").unlink()  # keep_last removed the file last.ckpt named: it still loads
    assert torch.load(folder / "last.ckpt", weights_only=True) == {"global_step": 2}
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_000001.ckpt"]
    (folder / "last.ckpt").unlink()
    (folder / "last.ckpt").symlink_to("step_000009.ckpt")  # e.g. Lightning's own link, left dangling
    assert latest_checkpoint(tmp_path) == folder / "step_000001.ckpt"


def test_a_missing_resume_file_fails_before_any_model_loads(tmp_path):
    overrides = fast_overrides(tmp_path / "no-model", tmp_path / "run") + [f"resume={tmp_path / 'nope.ckpt'}"]
    with pytest.raises(ConfigError, match="resume: .* is not a complete checkpoint"):
        train(compose_config(overrides))


def test_deepspeed_checkpoint_folders_count_once_their_save_finished(tmp_path):
    folder = tmp_path / "checkpoints"
    SafeCheckpointIO().save_checkpoint({"global_step": 2}, folder / "step_000002.ckpt")
    # DeepSpeed saves a folder of shards per checkpoint and writes its `latest` tag file last.
    partial = folder / "step_000004.ckpt"
    (partial / "checkpoint").mkdir(parents=True)
    (partial / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"shards")
    os.utime(partial, ns=(2**62, 2**62))  # the newest candidate
    assert latest_checkpoint(tmp_path) == folder / "step_000002.ckpt"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(partial), tmp_path)
    (partial / "latest").write_text("checkpoint")
    assert latest_checkpoint(tmp_path) == partial
    assert resolve_resume(str(partial), tmp_path) == str(partial)


def test_a_fresh_run_refuses_a_folder_holding_checkpoints(tmp_path):
    SafeCheckpointIO().save_checkpoint({"global_step": 5}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="resume=auto"):
        resolve_resume(None, tmp_path)
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(
    "env, stamp",
    [
        ({"SLURM_JOB_ID": "812"}, "slurm-812"),
        ({"SLURM_JOB_ID": "813", "SLURM_ARRAY_JOB_ID": "800", "SLURM_ARRAY_TASK_ID": "3"}, "slurm-800_3"),
        ({"TORCHELASTIC_RUN_ID": "abc"}, "torchrun-abc"),
    ],
)
def test_cluster_jobs_get_one_run_folder_for_all_ranks_and_requeues(monkeypatch, env, stamp):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_stamp() == stamp
