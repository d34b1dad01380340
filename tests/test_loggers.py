"""Loggers: secrets masked, W&B offline without credentials (no prompt), images and scalars logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, fast_overrides

from finetune.loggers import mask_secrets, wandb_logged_in, wandb_logger
from finetune.train import train


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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    secret = "sk-do-not-leak-1234"
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=2)
    overrides += ["logger=[tensorboard,wandb]", f"+wandb_api_key={secret}"]
    run = train(compose_config(overrides))

    events = EventAccumulator(str(run.run_dir / "tensorboard")).Reload()
    assert {"train/loss", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert {"samples", "before_after"} <= set(events.Tags()["images"])
    assert list((run.run_dir / "wandb").glob("offline-run-*"))
    for path in run.run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
