"""The tiny random model (`model=tiny_random`): built without touching the run's random stream, and
saved so that processes building it at the same time all end with one complete folder."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import REPO, compose_config, fast_overrides
from safetensors.torch import load_file

from finetune.tiny.builder import build_tiny_pipeline, build_tiny_sdxl_pipeline, save_tiny_pipeline
from finetune.train import train


def test_building_the_tiny_model_leaves_the_global_random_state_alone():
    for build in (build_tiny_pipeline, build_tiny_sdxl_pipeline):
        torch.manual_seed(123)
        expected = torch.rand(4)
        torch.manual_seed(123)
        first = build(seed=0)
        assert torch.equal(torch.rand(4), expected)
        second = build(seed=0)  # and it is still the same model every time
        assert all(
            torch.equal(a, b) for a, b in zip(first.unet.parameters(), second.unet.parameters(), strict=True)
        )


def test_the_run_that_builds_the_model_trains_like_the_runs_that_load_it(tmp_path):
    model = tmp_path / "tiny-random"
    exported = []
    for run in ("builds", "loads"):
        overrides = fast_overrides(model, tmp_path / run, steps=2) + [
            "model.build_tiny=true",
            "validation.every_n_steps=0",
            "checkpoint.every_n_steps=0",
        ]
        train(compose_config(overrides))
        exported.append(load_file(tmp_path / run / "adapter" / "pytorch_lora_weights.safetensors"))
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][key], exported[1][key]) for key in exported[0])


def test_a_model_saved_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch):
    """The rename that finds another process's complete folder in place keeps it and does not fail."""
    import finetune.tiny.builder as tiny

    target = tmp_path / "tiny"

    def build_while_another_process_saves(seed: int):
        build_tiny_pipeline(seed).save_pretrained(target, safe_serialization=True)  # the other process
        return build_tiny_pipeline(seed)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", build_while_another_process_saves)
    assert save_tiny_pipeline(target) == target
    assert (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no half-written folder left beside it


def test_processes_building_the_same_model_at_once_all_succeed(tmp_path):
    target = tmp_path / "tiny"
    code = f"from finetune.tiny.builder import save_tiny_pipeline; save_tiny_pipeline({str(target)!r})"
    processes = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    assert all(process.returncode == 0 for process in processes), errors
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
