"""Secrets given in the environment or on the command line end up in no file of the run."""

from __future__ import annotations

import pytest
from conftest import STYLE_DATA, run_module

from finetune.secrets import MASK, mask_secrets, mask_text


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
        f"hydra.run.dir={run_dir}",
    ]
    done = run_module("finetune.train", args, WANDB_API_KEY="env-secret-value")
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in files) and any(p.suffix == ".ckpt" for p in files)
    for path in files:
        data = path.read_bytes()
        assert b"cli-secret-value" not in data and b"env-secret-value" not in data, path
    assert b"cli-secret-value" not in (done.stdout + done.stderr).encode()
