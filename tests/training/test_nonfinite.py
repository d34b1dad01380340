"""Non-finite steps are skipped and counted, too many in a row stop the run, and nothing NaN is saved."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_config, fast_overrides
from safetensors.torch import load_file

from finetune.config.errors import NonFiniteError
from finetune.train import train


def _poison(batches: list[int], what: str) -> list[str]:
    return [
        "+callbacks.poison._target_=helpers.PoisonSteps",
        f"+callbacks.poison.batches={batches}",
        f"+callbacks.poison.what={what}",
    ]


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_nan_step_is_skipped_and_nothing_saved_holds_nan(tiny_model, tmp_path, what):
    overrides = (
        fast_overrides(tiny_model, tmp_path, steps=4) + _poison([1], what) + ["data.random_flip=false"]
    )
    result = train(compose_config(overrides))
    assert result.global_step == 4  # the poisoned one is counted as a step, but changed nothing
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/skipped_steps")]
    skipped = [float(row["train/skipped_steps"]) for row in rows]
    assert skipped[0] == 0.0 and skipped[-1] == 1.0  # a dashboard series: the count of skipped steps
    for checkpoint in (tmp_path / "checkpoints").glob("*.ckpt"):
        weights = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert weights and all(torch.isfinite(w).all() for w in weights.values()), checkpoint
    exported = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in exported.values())
    lora_b = [w for name, w in exported.items() if "lora_B" in name]
    assert any(w.abs().sum() > 0 for w in lora_b)  # the good steps still trained


def test_too_many_nan_steps_in_a_row_stop_the_run_with_a_clear_message(tiny_model, tmp_path):
    overrides = fast_overrides(tiny_model, tmp_path, steps=6) + _poison(list(range(100)), "loss")
    overrides += ["optim.max_nonfinite_in_a_row=3"]
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite loss"):
        train(compose_config(overrides))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_skipped_step_changes_no_weight(tiny_model, tmp_path, what):
    overrides = fast_overrides(tiny_model, tmp_path, steps=1) + _poison([0], what) + ["optim.lr=1e-2"]
    result = train(compose_config(overrides))
    lora_b = [p for name, p in result.module.named_parameters() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # still their zero init


def test_only_a_grad_scaler_takes_over_steps_with_inf_gradients():
    """16-mixed has a grad scaler, which skips inf-gradient steps itself; 16-true and bf16 have none,
    so their NaN/inf steps are ours to skip (the check once matched any precision starting with 16)."""
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

    from finetune.training.nonfinite import grad_scaler_skips_inf

    assert grad_scaler_skips_inf(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")))
    assert not grad_scaler_skips_inf(HalfPrecision("16-true"))
    assert not grad_scaler_skips_inf(HalfPrecision("bf16-true"))
    assert not grad_scaler_skips_inf(MixedPrecision("bf16-mixed", "cpu"))
    assert not grad_scaler_skips_inf(Precision())


class StandInEngine:
    """What `judge_deepspeed_step` reads from a DeepSpeed engine after its step."""

    def __init__(self, applied: bool, norm: float | None, fp16: bool = False) -> None:
        self.applied, self.norm, self.fp16 = applied, norm, fp16

    def was_step_applied(self) -> bool:
        return self.applied

    def get_global_grad_norm(self) -> float | None:
        return self.norm

    def fp16_enabled(self) -> bool:
        return self.fp16


def test_deepspeed_steps_are_judged_by_deepspeeds_own_norm_and_overflow_signal():
    """Under DeepSpeed the gradients live in its partitions (p.grad is None): the norm and the
    skip come from the engine, not from our own look at the gradients."""
    from finetune.training.nonfinite import NonFiniteSteps, judge_deepspeed_step

    steps, fine, nan = NonFiniteSteps(limit=3), torch.tensor([0.5]), torch.tensor([float("nan")])
    assert judge_deepspeed_step(StandInEngine(True, 2.5), fine, steps, 0) == 2.5
    assert steps.total == 0 and not steps.last_skipped
    assert judge_deepspeed_step(StandInEngine(False, None), fine, steps, 1) is None  # overflow: skipped
    assert steps.total == 1 and steps.in_a_row == 1 and steps.last_skipped
    # fp16 loss scaling skips overflowing steps while it finds its scale: not counted, but not applied
    judge_deepspeed_step(StandInEngine(False, None, fp16=True), fine, steps, 2)
    assert steps.total == 1 and steps.in_a_row == 0 and steps.last_skipped
    judge_deepspeed_step(StandInEngine(False, None, fp16=True), nan, steps, 3)  # a NaN loss always counts
    assert steps.total == 2
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        for step in range(4, 7):
            judge_deepspeed_step(StandInEngine(False, None), nan, steps, step)


def test_skipped_step_counts_travel_with_checkpoints(tiny_model, tmp_path):
    overrides = fast_overrides(tiny_model, tmp_path, steps=2) + _poison([1], "gradient")
    train(compose_config(overrides))
    checkpoint = torch.load(tmp_path / "checkpoints" / "step_000002.ckpt", weights_only=True)
    assert checkpoint["nonfinite_steps"] == {"total": 1, "in_a_row": 1}
    resumed = fast_overrides(tiny_model, tmp_path, steps=4) + ["resume=auto"]
    result = train(compose_config(resumed))
    assert result.global_step == 4 and result.module.nonfinite.total == 1


def test_the_ema_skips_a_skipped_step(tiny_model, tmp_path):
    """A skipped step leaves the weights as they were; the EMA's step count (its warm-up) stays too."""
    overrides = fast_overrides(tiny_model, tmp_path, steps=3) + _poison([1], "gradient")
    overrides += ["method=full", "validation.every_n_steps=0", "checkpoint.every_n_steps=0"]
    result = train(compose_config(overrides))
    assert result.global_step == 3 and result.module.nonfinite.total == 1
    assert result.module.method.ema.optimization_step == 2


def _prepared(tiny_model, tmp_path, method: list[str]):
    """The model and method as train() prepares them, without training."""
    import torch as torch_module

    from finetune.models.loading import load_components
    from finetune.training.methods import build_method

    cfg = compose_config(fast_overrides(tiny_model, tmp_path / "run") + method)
    components = load_components(cfg.model, torch_module.float32)
    built = build_method(cfg.method)
    return built.prepare(components), built


def _poison_one(parameters) -> None:
    with torch.no_grad():
        next(iter(parameters)).view(-1)[0] = float("inf")


@pytest.mark.parametrize(
    "method, poisoned, written",
    [
        (
            ["method=lora"],
            lambda c, m: [p for n, p in c.unet.named_parameters() if "lora_B" in n],
            ["adapter"],
        ),
        (["method=full"], lambda c, m: m.ema.shadow_params, ["model", "model.safetensors"]),
        (
            ["method=controlnet", "data.conditioning=canny", "method.unet_lora_rank=2"],
            lambda c, m: c.controlnet.parameters(),
            ["controlnet", "controlnet.safetensors", "adapter"],
        ),
        (
            ["method=controlnet", "data.conditioning=canny", "method.unet_lora_rank=2"],
            lambda c, m: [p for n, p in c.unet.named_parameters() if "lora_B" in n],
            ["controlnet", "controlnet.safetensors", "adapter"],
        ),
    ],
    ids=["lora", "full-ema", "controlnet", "controlnet-unet-lora"],
)
def test_no_export_is_written_with_nan_or_inf_in_it(tiny_model, tmp_path, method, poisoned, written):
    components, built = _prepared(tiny_model, tmp_path, method)
    out = tmp_path / "export"
    built.export(components, out, metadata={})  # a healthy model exports
    assert all((out / name).exists() for name in written)
    _poison_one(poisoned(components, built))
    again = tmp_path / "export-again"
    with pytest.raises(NonFiniteError, match="export"):
        built.export(components, again, metadata={})
    assert not again.exists() or not any(again.iterdir())
