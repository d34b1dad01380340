"""trainer=fsdp and trainer=deepspeed on a CUDA GPU in bf16: train, checkpoint, resume, export.

Marked `gpu`: skipped without CUDA (and the DeepSpeed case without the deepspeed package)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_module, strategy_args
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategy_trains_resumes_and_exports_on_a_gpu(
    tiny_model: Path, tmp_path: Path, strategy: str
) -> None:
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"

    def args(steps: int) -> list[str]:
        gpu = strategy_args(tiny_model, run_dir, strategy, steps, accelerator="gpu", devices=1)
        return gpu + ["trainer.precision=bf16-mixed", "optim.lr=1e-2"]

    run_module("finetune.train", args(2))
    done = run_module("finetune.train", args(4) + ["resume=auto"])
    assert "continuing from" in done.stderr + done.stdout

    first = load_file(run_dir / "adapter" / "pytorch_lora_weights.safetensors")
    resumed = load_file(run_dir / "exports" / "step_000004" / "adapter" / "pytorch_lora_weights.safetensors")
    assert first.keys() == resumed.keys()
    lora_b = [name for name in first if "lora_B" in name]
    assert all(torch.isfinite(resumed[name]).all() for name in resumed)
    assert any(first[name].abs().sum() > 0 for name in lora_b)  # trained
    assert any(not first[name].equal(resumed[name]) for name in lora_b)  # and trained on after resume


def test_deepspeed_logs_its_grad_norm_and_skips_a_nan_step(tiny_model: Path, tmp_path: Path) -> None:
    """ZeRO-2 keeps gradients in its partitions: the norm and the skip come from DeepSpeed itself."""
    pytest.importorskip("deepspeed")
    from conftest import logged_metric

    run_dir = tmp_path / "run"
    args = strategy_args(tiny_model, run_dir, "deepspeed", 4, accelerator="gpu", devices=1)
    poison = ["+callbacks.poison._target_=helpers.PoisonSteps", "+callbacks.poison.batches=[1]"]
    run_module("finetune.train", args + ["trainer.log_every_n_steps=1", *poison])
    norms = logged_metric(run_dir, "train/grad_norm")
    assert norms and all(value > 0 for value in norms.values())  # once always 0: p.grad is None there
    assert max(logged_metric(run_dir, "train/skipped_steps").values()) == 1.0
    exported = load_file(run_dir / "adapter" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(value).all() for value in exported.values())
