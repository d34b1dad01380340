"""`method=full`: train every U-Net weight, keep an EMA of them, export a whole model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from finetune.config.errors import ExportExistsError
from finetune.config.files import atomic_dir, check_finite
from finetune.config.methods import FullMethodConfig
from finetune.models.loading import Components
from finetune.training.methods.base import unet_denoise

log = logging.getLogger(__name__)


class EMACallback(L.Callback):
    """Updates the EMA after every optimizer step; its state travels in Lightning checkpoints."""

    def __init__(self, ema: EMAModel, unet: UNet2DConditionModel) -> None:
        self.ema = ema
        self.unet = unet
        self.last_step = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # After any checkpoint restore, so restored shadow weights move to the device too.
        self.ema.to(module.device)
        self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.last_step:  # an accumulation-only batch: no step yet
            return
        self.last_step = trainer.global_step
        # A skipped step (NaN/inf) left the weights as they were; the EMA's count of steps, which
        # sets its warm-up decay, must not move either.
        if not module.nonfinite.last_skipped:
            self.ema.step(self.unet.parameters())

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict)


class FullMethod:
    """All U-Net weights train in float32; samples and exports use the EMA weights."""

    name = "full"
    denoise = staticmethod(unet_denoise)

    def __init__(self, cfg: FullMethodConfig) -> None:
        self.cfg = cfg
        self.ema: EMAModel | None = None
        self.unet: UNet2DConditionModel | None = None

    def prepare(self, components: Components) -> Components:
        unet = components.unet
        unet.to(torch.float32).requires_grad_(True)
        self.unet = unet
        if self.cfg.ema:
            self.ema = EMAModel(
                unet.parameters(),
                decay=self.cfg.ema_decay,
                use_ema_warmup=self.cfg.ema_warmup,
                power=self.cfg.ema_power,
                model_cls=UNet2DConditionModel,
                model_config=unet.config,
            )
        return components  # its U-Net now trains

    def trainable_modules(self, components: Components) -> list[torch.nn.Module]:
        return [components.unet]

    def callbacks(self) -> list[L.Callback]:
        return [EMACallback(self.ema, self.unet)] if self.ema is not None else []

    def inference_weights(self) -> Any:
        """Swap the EMA weights in for sampling and export; the training weights come back after."""
        return self._ema_weights() if self.ema is not None else nullcontext()

    @contextmanager
    def _ema_weights(self) -> Iterator[None]:
        parameters = list(self.unet.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def summary(self) -> dict[str, Any]:
        return {"method": "full", "ema": self.cfg.ema, "ema_decay": self.cfg.ema_decay}

    def export(self, components: Components, run_dir: Path, metadata: dict[str, str]) -> dict[str, Path]:
        """`<run_dir>/model/`: a diffusers pipeline folder, plus `model.safetensors` (original layout;
        SD 1.x / 2.x only)."""
        from finetune.export.single_file import save_single_file

        out_dir = run_dir / "model"
        if out_dir.exists():  # e.g. a finished run resumed into its own folder: never replace an export
            raise ExportExistsError(
                f"{out_dir} already exists; move it away to export again (the weights are in checkpoints/)"
            )
        pipe = components.pipeline()
        written = {"diffusers": out_dir}
        with self.inference_weights():
            check_finite(pipe.unet.state_dict(), "export")  # before any file is written
            with atomic_dir(out_dir) as partial:  # the folder appears complete or not at all
                pipe.save_pretrained(partial, safe_serialization=True)
            if self.cfg.save_single_file and components.is_sdxl:
                log.warning(
                    "method.save_single_file: the original-layout file is written for SD 1.x / 2.x only; "
                    "this SDXL model is exported as the diffusers folder %s",
                    out_dir,
                )
            elif self.cfg.save_single_file:
                written["single_file"] = save_single_file(
                    pipe, run_dir / "model.safetensors", metadata=metadata
                )
        return written
