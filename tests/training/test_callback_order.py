"""The order of the loop's callbacks is built in (`in_step_order`), not left to how a list was written."""

from __future__ import annotations

import random
from types import SimpleNamespace

import lightning as L
import torch
from conftest import compose_config

from finetune.checkpointing.checkpoints import StepCheckpoint
from finetune.checkpointing.interrupt import StopOnSignal
from finetune.training.callbacks import DataCachePass, DataReport, StepProgressBar, in_step_order
from finetune.validation.fidelity import HoldoutFidelity
from finetune.validation.loss import ValidationLoss
from finetune.validation.samples import SampleGrid


class WeightsUpdate(L.Callback):
    """Stands for a method's callback, such as the EMA update of method=full."""


def test_weights_change_then_are_measured_then_saved_whatever_order_they_come_in(tmp_path):
    cfg = compose_config([])
    ema = WeightsUpdate()
    everything = [
        DataCachePass(),
        DataReport(tmp_path / "report.json"),
        ema,
        SampleGrid(cfg.validation, tmp_path / "samples", 32),
        ValidationLoss([100], 0, 0),
        HoldoutFidelity(cfg.validation),
        StepCheckpoint(dirpath=tmp_path, every_n_train_steps=1),
        StopOnSignal(tmp_path / "last.ckpt"),
        StepProgressBar(),
    ]
    for seed in range(20):
        given = list(everything)
        random.Random(seed).shuffle(given)
        ordered = in_step_order(given)
        assert sorted(map(id, ordered)) == sorted(map(id, everything))  # nothing lost or doubled
        position = {type(callback): ordered.index(callback) for callback in ordered}
        assert position[DataCachePass] < position[DataReport]  # the report lists what the cache dropped
        measuring = [position[kind] for kind in (SampleGrid, ValidationLoss, HoldoutFidelity)]
        saving = [position[kind] for kind in (StepCheckpoint, StopOnSignal)]
        assert position[WeightsUpdate] < min(measuring) and max(measuring) < min(saving), seed


def test_callbacks_of_one_rank_keep_the_order_they_were_given():
    first, second = WeightsUpdate(), WeightsUpdate()
    assert in_step_order([first, second]) == [first, second]
    assert in_step_order([second, first]) == [second, first]


class Placed(torch.nn.Module):
    """A model that records where it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def to(self, device: torch.device | str) -> Placed:
        self.sent.append(str(device))
        return self


def _places_after_the_cache_pass(text_cached: bool, device: str) -> list[list[str]]:
    vae, encoder = Placed(), Placed()
    cache = SimpleNamespace(text_keys=["caption"] if text_cached else None)
    datamodule = SimpleNamespace(prepare_cache=lambda vae, prompts, strategy: cache)
    components = SimpleNamespace(prompts=None, text_encoders=[encoder])
    module = SimpleNamespace(device=torch.device(device), vae=vae, components=components)
    DataCachePass().on_fit_start(SimpleNamespace(datamodule=datamodule, strategy=None), module)
    return [vae.sent, encoder.sent]


def test_the_vae_and_text_encoders_leave_the_gpu_once_everything_they_give_is_cached() -> None:
    assert _places_after_the_cache_pass(text_cached=True, device="cuda") == [["cpu"], ["cpu"]]
    # Text encoded every step (a text encoder trains, or tags shuffle): both stay, as on a CPU run.
    assert _places_after_the_cache_pass(text_cached=False, device="cuda") == [[], []]
    assert _places_after_the_cache_pass(text_cached=True, device="cpu") == [[], []]
