"""Test-only Lightning callbacks, loaded through the `callbacks` config key like a user's own."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from safetensors.torch import save_file


class TrainableWeightsDump(L.Callback):
    """Every rank writes its trainable weights at the end, to compare ranks after DDP."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        save_file(weights, self.out_dir / f"rank{trainer.global_rank}.safetensors")


class SeenSamples(L.Callback):
    """Appends the record indices of every trained batch to `<out_dir>/rank<r>.txt`, a line per batch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.txt", "a") as handle:
            handle.write(" ".join(str(i) for i in batch["index"].tolist()) + "\n")


class CrashAtStep(L.Callback):
    """Raises when a batch starts at optimizer step `step`: a crash just after that step's checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


class PoisonSteps(L.Callback):
    """Puts NaN into the batch (`what=loss`) or the gradients (`what=gradient`) of the given batches."""

    def __init__(self, batches: list[int], what: str = "loss") -> None:
        self.batches, self.what, self.seen = set(batches), what, -1

    def on_train_batch_start(self, trainer: L.Trainer, module, batch, batch_idx: int) -> None:
        self.seen += 1
        if self.what == "loss" and self.seen in self.batches:
            batch["pixel_values"].fill_(float("nan"))

    def on_after_backward(self, trainer: L.Trainer, module) -> None:
        if self.what == "gradient" and self.seen in self.batches:
            for parameter in module.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))
