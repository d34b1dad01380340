"""Loggers: secrets masked, W&B offline without credentials (no prompt), images and scalars logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, fast_overrides

from finetune.train import train
from finetune.training.loggers import mask_secrets, wandb_logged_in, wandb_logger


def test_secret_looking_keys_are_masked_at_any_depth() -> None:
    cfg = {"wandb": {"api_key": "abc", "project": "p"}, "hf_token": "hf_x", "items": [{"password": "pw"}]}
    masked = mask_secrets(cfg)
    assert masked == {
        "wandb": {"api_key": "***", "project": "p"},
        "hf_token": "***",
        "items": [{"password": "***"}],
    }


def test_wandb_goes_offline_with_a_hint_when_not_logged_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert not wandb_logged_in()
    logger = wandb_logger(save_dir=str(tmp_path), project="finetune-test")
    assert logger._offline
    assert "wandb sync" in caplog.text


def test_wandb_online_when_an_api_key_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logged_in()
    assert not wandb_logger(save_dir=str(tmp_path), project="finetune-test")._offline


@pytest.mark.slow
def test_tensorboard_and_wandb_get_scalars_images_and_masked_config(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    logged_artifacts = []
    real_log_artifact = wandb.sdk.wandb_run.Run.log_artifact

    def log_artifact(self, artifact, *args, **kwargs):
        logged_artifacts.append(artifact)
        return real_log_artifact(self, artifact, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log_artifact", log_artifact)
    secret = "sk-do-not-leak-1234"
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=2)
    overrides += ["logger=[tensorboard,wandb]", f"+wandb_api_key={secret}"]
    run = train(compose_config(overrides))

    events = EventAccumulator(str(run.run_dir / "tensorboard")).Reload()
    assert {"train/loss", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert {"samples", "before_after"} <= set(events.Tags()["images"])
    (caption,) = events.Tensors("samples/caption/text_summary")[-1].tensor_proto.string_val
    # The prompts of the grid with the settings each was drawn with, in the Text tab
    assert caption.decode() == "a red circle [32x32, seed 0, guidance 7.5, 2 steps]"
    assert list((run.run_dir / "wandb").glob("offline-run-*"))
    (artifact,) = logged_artifacts  # the export, as a model artifact of the run
    assert artifact.type == "model"
    assert {"adapter/pytorch_lora_weights.safetensors", "adapter/lora_kohya.safetensors"} <= set(
        artifact.manifest.entries
    )
    for path in run.run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # logged in: online, where runs can be resumed
    (tmp_path / "wandb" / "run-20260101_000000-older").mkdir(parents=True)
    (tmp_path / "wandb" / "run-20260102_000000-abc123").mkdir()
    created = {}
    monkeypatch.setattr(WandbLogger, "__init__", lambda self, **kwargs: created.update(kwargs))
    wandb_logger(save_dir=str(tmp_path), project="p", continue_run=True)
    assert created["id"] == "abc123" and created["resume"] == "allow"
    created.clear()
    wandb_logger(save_dir=str(tmp_path), project="p")  # a fresh run gets a fresh id
    assert "id" not in created


@pytest.mark.slow
def test_a_resumed_offline_run_says_how_to_join_its_parts(tiny_model: Path, tmp_path: Path) -> None:
    from conftest import STYLE_DATA, run_module

    run_dir = tmp_path / "run"
    args = [
        f"model.pretrained={tiny_model}",
        f"data.path={STYLE_DATA}",
        "trainer.max_steps=3",
        "trainer.accelerator=cpu",
        "validation.every_n_steps=0",
        "validation.prompts=[]",
        "checkpoint.every_n_steps=1",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        "resume=auto",
    ]
    kill = ["+callbacks.kill._target_=helpers.KillAt", "+callbacks.kill.step=2"]
    run_module("finetune.train", [*args, *kill, "+callbacks.kill.moment=after-step"], returncode=-9)
    done = run_module("finetune.train", args, WANDB_MODE="offline")
    first = sorted((run_dir / "wandb").glob("offline-run-*"))[0].name.rsplit("-", 1)[1]
    assert f"wandb sync --id {first}" in done.stdout + done.stderr
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
