"""Secrets given in the environment or on the command line end up in no file of the run."""

from __future__ import annotations

import pytest
import yaml
from conftest import STYLE_DATA, run_module

from finetune.config.secrets import MASK, is_secret_key, mask_secrets, mask_text


def test_masking_covers_keys_lists_and_override_strings():
    config = {
        "wandb": {"api_key": "k1"},
        "overrides": ["+hf_token=k2", "lr=1e-4"],
        "dirname": "a=1,my_secret=k3",
    }
    assert mask_secrets(config) == {
        "wandb": {"api_key": MASK},
        "overrides": [f"+hf_token={MASK}", "lr=1e-4"],
        "dirname": f"a=1,my_secret={MASK}",
    }
    assert mask_text("a red circle, in zkz style") == "a red circle, in zkz style"


SECRET_KEYS = [
    "api_key", "WANDB_API_KEY", "apiKey", "hf_token", "HF_TOKEN", "access_token", "token",
    "service.api_token", "password", "db_passwd", "client_secret", "aws_secret_access_key",
    "credentials", "private_key",
]  # fmt: skip
SETTINGS = [
    "keep_tokens", "data.keep_tokens", "max_token_length", "tokenizer", "tokenizer_2", "pad_token_id",
    "token_file", "secretary", "keyword", "passage",
]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_masked(key):
    assert is_secret_key(key)
    assert mask_secrets({key: "s3cr3t"}) == {key: MASK}
    assert mask_text(f"{key}=s3cr3t,lr=1") == f"{key}={MASK},lr=1"


@pytest.mark.parametrize("key", SETTINGS)
def test_settings_that_contain_a_secret_word_are_kept(key):
    """Masking is by whole words: a word that only contains `token` or `secret` is not one."""
    assert not is_secret_key(key)
    assert mask_secrets({key: 1}) == {key: 1}
    assert mask_text(f"{key}=2") == f"{key}=2"


@pytest.mark.slow
def test_no_file_under_the_run_dir_holds_a_secret(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"model.pretrained={tiny_model}",
        f"data.path={STYLE_DATA}",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "validation.num_inference_steps=2",
        "validation.prompts=[a red circle]",
        "checkpoint.every_n_steps=1",
        "logger=[csv,tensorboard,wandb]",  # W&B offline (conftest)
        "+service.api_token=cli-secret-value",
        "+service.wandb_api_key=cli-secret-value",
        "data.shuffle_tags=true",
        "data.keep_tokens=1",
        f"hydra.run.dir={run_dir}",
    ]
    done = run_module("finetune.train", args, WANDB_API_KEY="env-secret-value")
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in files) and any(p.suffix == ".ckpt" for p in files)
    for path in files:
        data = path.read_bytes()
        assert b"cli-secret-value" not in data and b"env-secret-value" not in data, path
    assert b"cli-secret-value" not in (done.stdout + done.stderr).encode()
    # The run record can be run again: settings whose names merely contain "token" keep their values.
    recorded = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert recorded["data"]["keep_tokens"] == 1
    assert recorded["service"] == {"api_token": MASK, "wandb_api_key": MASK}
    assert "data.keep_tokens=1" in (run_dir / ".hydra" / "overrides.yaml").read_text()
