"""DDP on two CPU processes (gloo), launched the way a user would: the CLI with trainer=ddp.

The run also caches latents in memory, so the ranks' shared cache pre-pass is exercised too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import STYLE_DATA, run_module
from safetensors.torch import load_file

# method -> (extra overrides, a weight that starts at zero and must have trained, the export)
METHODS = {
    # LoHa on attention and convolutions: LyCORIS-style factors (hada_w2_b starts at zero), and adapters
    # on the ResNet blocks' convolutions
    "loha": (["method.algo=loha", "method.conv_rank=4"], "hada_w2_b", "adapter/lora_kohya.safetensors"),
    "controlnet": (["method=controlnet", "data.conditioning=canny"], "controlnet_mid_block", "controlnet"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_process_ddp_averages_gradients_and_only_rank_zero_writes(
    tiny_model: Path, tmp_path: Path, method: str
) -> None:
    extra, zero_init, export = METHODS[method]
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    args = extra + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        f"model.pretrained={tiny_model}",
        f"data.path={STYLE_DATA}",
        "data.batch_size=2",
        "data.cache=memory",  # each rank encodes half, then the ranks swap their halves
        "optim.lr=1e-2",
        "validation.every_n_steps=0",
        "validation.num_inference_steps=2",
        "validation.prompts=[a red circle]",
        "checkpoint.every_n_steps=3",
        "logger=tensorboard",
        f"hydra.run.dir={run_dir}",
        "+callbacks.dump._target_=helpers.TrainableWeightsDump",
        f"+callbacks.dump.out_dir={dumps}",
        "+callbacks.seen._target_=helpers.SeenSamples",
        f"+callbacks.seen.out_dir={tmp_path / 'seen'}",
    ]
    done = run_module("finetune.train", args)

    rank0, rank1 = load_file(dumps / "rank0.safetensors"), load_file(dumps / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert rank0[name].equal(rank1[name]), name  # same weights after every averaged step
    assert any(rank0[name].abs().sum() > 0 for name in rank0 if zero_init in name)  # and they did train

    assert re.search(r"data.cache=memory: \d+ entries computed", done.stderr + done.stdout)
    # Each rank trained on its own share: 3 steps x 2 images per rank, no image on both ranks.
    seen = [(tmp_path / "seen" / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])

    # Files are written once, by rank 0: one TensorBoard event file, one export, one checkpoint set.
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step_000003.ckpt"]
    assert (run_dir / export).exists()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "before_after.png",
        "step_000000.png",
        "step_000003.png",
    ]
