"""trainer=fsdp (FSDP2) on two CPU processes: the trained weights are sharded, training matches DDP,
only rank 0 writes, and a resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import logged_metric, run_module, strategy_args
from safetensors.torch import load_file

# case -> (base model fixture, extra overrides, the exported weights file under the run folder)
METHODS = {
    "controlnet": (
        "tiny_model",
        ["method=controlnet", "data.conditioning=canny"],
        "controlnet/diffusion_pytorch_model.safetensors",
    ),
    # SDXL with LoRA on both text encoders (sharded layer by layer; the first one's penultimate layer
    # is what the U-Net reads).
    "sdxl_text_encoders": (
        "tiny_sdxl_model",
        ["method.train_text_encoder=true"],
        "adapter/pytorch_lora_weights.safetensors",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp_shards_the_trained_weights_and_trains_like_ddp(
    request: pytest.FixtureRequest, tmp_path: Path, method: str
) -> None:
    model_fixture, extra, export = METHODS[method]
    tiny_model = request.getfixturevalue(model_fixture)
    shards = tmp_path / "shards"
    # 3 held-out images on 2 ranks: an uneven share of the validation loss's forward passes.
    extra = extra + ["data.holdout=3", "validation.loss_timesteps=[200,800]"]
    sharded = strategy_args(tiny_model, tmp_path / "fsdp", "fsdp", steps=3) + [
        "+callbacks.shards._target_=helpers.ShardSizes",
        f"+callbacks.shards.out_dir={shards}",
    ]
    run_module("finetune.train", extra + sharded)
    run_module("finetune.train", extra + strategy_args(tiny_model, tmp_path / "ddp", "ddp", steps=3))
    fsdp_loss, ddp_loss = (logged_metric(tmp_path / run, "val/loss") for run in ("fsdp", "ddp"))
    assert sorted(fsdp_loss) == sorted(ddp_loss) == [0, 3]
    assert fsdp_loss == pytest.approx(ddp_loss, rel=1e-5)

    # Each rank holds only its part of what trains, and the parts add up to the whole.
    sizes = [[int(n) for n in (shards / f"rank{r}.txt").read_text().split()] for r in range(2)]
    (local0, total), (local1, _) = sizes
    assert 0 < local0 < total and 0 < local1 < total and local0 + local1 == total

    # The same averaged gradients as DDP, so the same weights up to float summation order (AdamW
    # turns a flipped sign of a near-zero gradient into a full learning-rate step, which this catches).
    fsdp, ddp = load_file(tmp_path / "fsdp" / export), load_file(tmp_path / "ddp" / export)
    assert fsdp.keys() == ddp.keys() and fsdp
    for name in fsdp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-6, msg=name)
    trained = [name for name in fsdp if "lora_B" in name or "controlnet_mid_block" in name]
    assert trained and any(fsdp[name].abs().sum() > 0 for name in trained)

    # The checkpoint is one file on rank 0 with whole trainable weights under the usual names.
    checkpoint = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in checkpoint["state_dict"].items():
        assert value.shape == reference["state_dict"][name].shape, name
    # Rank 0 alone writes the samples (all ranks sample together: the forward pass gathers weights).
    assert sorted(p.name for p in (tmp_path / "fsdp" / "samples").iterdir()) == [
        "before_after.png",
        "step_000000.png",
        "step_000003.png",
    ]


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(tiny_model: Path, tmp_path: Path) -> None:
    # LoKr on attention and convolutions: its factors are parameters of their own (no Linear inside),
    # and the ResNet convolutions' adapters are sharded with their blocks too.
    lokr = ["method.algo=lokr", "method.conv_rank=2"]
    whole = tmp_path / "whole"  # 4 steps, a checkpoint every 2
    run_module("finetune.train", strategy_args(tiny_model, whole, "fsdp", steps=4) + lokr)
    # A second run resumes from the first one's step-2 checkpoint and trains steps 3 and 4 again.
    middle = whole / "checkpoints" / "step_000002.ckpt"
    resumed = tmp_path / "resumed"
    run_module(
        "finetune.train", strategy_args(tiny_model, resumed, "fsdp", steps=4) + lokr + [f"resume={middle}"]
    )
    # It started at step 2: its only periodic checkpoint is step 4's.
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["last.ckpt", "step_000004.ckpt"]

    expected = load_file(whole / "adapter" / "lora_kohya.safetensors")
    again = load_file(resumed / "adapter" / "lora_kohya.safetensors")
    assert expected.keys() == again.keys()
    for name in expected:
        assert expected[name].equal(again[name]), name
