"""Test-only Lightning callbacks, loaded through the `callbacks` config key like a user's own."""

from __future__ import annotations

import io as io_module
import os
import signal
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from finetune.config.files import atomic_path


class TrainableWeightsDump(L.Callback):
    """Every rank writes its trainable weights at the end, to compare ranks after DDP."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        save_file(weights, self.out_dir / f"rank{trainer.global_rank}.safetensors")


class ShardSizes(L.Callback):
    """Every rank writes how many trainable numbers it holds and how many the model has, at the start."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        trainable = [p for p in module.parameters() if p.requires_grad]
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainable)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = f"{local} {sum(p.numel() for p in trainable)}"
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(text)


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
        if self.what == "loss" and self.seen in self.batches:  # the images, or their cached latents
            batch["pixel_values" if "pixel_values" in batch else "latent_dist"].fill_(float("nan"))

    def on_after_backward(self, trainer: L.Trainer, module) -> None:
        if self.what == "gradient" and self.seen in self.batches:
            for parameter in module.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))


class LossLog(L.Callback):
    """Appends `<step> <epoch> <batch> <loss> <lr>` per trained batch to `path` (floats in hex: exact)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.step = -1

    def on_train_batch_start(self, trainer: L.Trainer, module, batch, batch_idx: int) -> None:
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        loss = float(outputs["loss"]) if outputs is not None else float("nan")
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        with open(self.path, "a") as handle:
            handle.write(f"{self.step} {trainer.current_epoch} {batch_idx} {loss.hex()} {float(lr).hex()}\n")


class KillAt(L.Callback):
    """Ends its own process at a chosen moment, as a crash or a scheduler would.

    `moment`, at the first chance from step `step` on: `mid-accumulation` (after the first micro-batch
    of a step), `after-step` (right after an optimizer step, before its checkpoint), `during-save`
    (half-way through writing a checkpoint: the temp file is left half written), `sigterm` (SIGTERM
    to itself mid-accumulation, so the run must finish the step, save and stop) or `requeue` (the
    same with SLURM's requeue signal, SIGUSR1).
    """

    def __init__(self, step: int, moment: str) -> None:
        self.step, self.moment, self._step_at_start, self.sent = step, moment, -1, False

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        if self.moment == "during-save":
            io = trainer.strategy.checkpoint_io
            original = io.save_checkpoint

            def save_then_die(checkpoint, path, storage_options=None):
                if checkpoint["global_step"] < self.step:
                    return original(checkpoint, path, storage_options)
                buffer = io_module.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getvalue()
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(Path(path)) as tmp:
                    with open(tmp, "wb") as handle:
                        handle.write(data[: len(data) // 2])
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)

            io.save_checkpoint = save_then_die

    def on_train_batch_start(self, trainer: L.Trainer, *_) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *_) -> None:
        stepped = trainer.global_step != self._step_at_start
        if self.moment == "after-step" and stepped and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        # ">=": a step whose epoch ends after one micro-batch has no middle; the next step does.
        mid = not stepped and self._step_at_start >= self.step
        if mid and self.moment == "mid-accumulation":
            os.kill(os.getpid(), signal.SIGKILL)
        signals = {"sigterm": signal.SIGTERM, "requeue": signal.SIGUSR1}
        if mid and self.moment in signals and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signals[self.moment])


class RemovalAudit(L.Callback):
    """Records, at each checkpoint removal, which complete checkpoints exist: `<out>` gets one line
    `<removed> <present...>` per removal."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        original = io.remove_checkpoint

        def audited_remove(path) -> None:
            present = sorted(p.name for p in Path(path).parent.glob("*.ckpt"))
            with open(self.out, "a") as handle:
                handle.write(" ".join([Path(path).name, *present]) + "\n")
            original(path)

        io.remove_checkpoint = audited_remove


class BatchShapes(L.Callback):
    """Writes the shape of each tensor of the first trained batch to `<out_dir>/shapes.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        import json

        path = self.out_dir / "shapes.json"
        if path.exists():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shapes = {name: list(value.shape) for name, value in batch.items() if isinstance(value, torch.Tensor)}
        path.write_text(json.dumps(shapes))
