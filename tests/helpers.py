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
