"""FID and KID at the end of training: samples from the held-out captions against the held-out images.

torchmetrics computes both from Inception features; the Inception weights must be on disk (nothing
is downloaded), and torch-fidelity installed (`pip install finetune[metrics]`). Without either, or
without `data.holdout` images, the metrics are skipped with one notice.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import lightning as L
import torch
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from finetune.config.schema import ValidationConfig
from finetune.models.sharding import runs_sampling
from finetune.validation.samples import sampling_pipeline

log = logging.getLogger(__name__)

KID_SUBSETS = 100  # torchmetrics' default; the kernel sums over a few hundred features are cheap


def load_inception(weights: str, features: int = 2048) -> NoTrainInceptionV3 | None:
    """torch-fidelity's Inception from a local weights file, None with a notice. FID is defined on the
    2048 features of its last pool; 64, 192 and 768 are earlier, cheaper layers."""
    if importlib.util.find_spec("torch_fidelity") is None:
        log.warning(
            "validation.inception_weights: FID/KID need torch-fidelity (pip install torch-fidelity); skipped"
        )
        return None
    try:
        # torch-fidelity unpickles the file fully: check first that it holds only tensors.
        torch.load(weights, map_location="cpu", weights_only=True)
        return NoTrainInceptionV3(
            "inception-v3-compat", [str(features)], feature_extractor_weights_path=weights
        )
    except (OSError, RuntimeError, ValueError) as error:
        log.warning("validation.inception_weights: cannot load '%s' (%s); FID/KID skipped", weights, error)
        return None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] → uint8, as the Inception features expect."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def kid_subset_size(count: int) -> int:
    """About half the samples, at least 2 (KID's unbiased estimate needs pairs): subsets of the whole
    set would all be the same set, and KID's std over them would mean nothing."""
    return max(2, count // 2)


def fidelity_scores(
    inception: NoTrainInceptionV3, real: torch.Tensor, fake: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """FID, and KID's mean and std over random subsets, of `fake` against `real` (uint8 [N, 3, H, W])."""
    count = min(real.shape[0], fake.shape[0])
    if count < 2:
        raise ValueError(f"FID/KID need at least 2 real and 2 generated images, got {count}")
    features = _SharedFeatures(inception)
    fid = FrechetInceptionDistance(feature=features)
    kid = KernelInceptionDistance(feature=features, subsets=KID_SUBSETS, subset_size=kid_subset_size(count))
    for images, is_real in ((real, True), (fake, False)):
        fid.update(images, real=is_real)
        kid.update(images, real=is_real)
    # KID draws its subsets from the global RNG: seed it, so the number repeats, and leave training's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"val/fid": float(fid.compute()), "val/kid": float(kid_mean), "val/kid_std": float(kid_std)}


class _SharedFeatures(torch.nn.Module):
    """The Inception, keeping the features of the last batch: FID and KID read the same features, and
    the Inception pass is nearly all of their cost."""

    def __init__(self, inception: NoTrainInceptionV3) -> None:
        super().__init__()
        self.inception = inception
        # Else torchmetrics runs a dummy image through the network to find the width.
        self.num_features = int(inception.features_list[0])
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not images:
            self._last = (images, self.inception(images))
        return self._last[1]


class HoldoutFidelity(L.Callback):
    """At the end of training (rank 0): one sample per held-out caption (seed `validation.seed + i`),
    then FID and KID of those samples against the held-out images, as val/fid, val/kid and val/kid_std."""

    def __init__(self, cfg: ValidationConfig) -> None:
        self.cfg = cfg
        self.scores: dict[str, float] = {}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not runs_sampling(trainer, module) or not self.cfg.inception_weights:
            return
        datamodule = trainer.datamodule
        if len(getattr(datamodule, "holdout", None) or ()) < 2:
            log.warning(
                "validation.inception_weights: FID/KID need at least 2 held-out images (data.holdout=N); "
                "skipped"
            )
            return
        inception = load_inception(self.cfg.inception_weights)
        if inception is None:
            return
        real, fake = self._images(trainer, module)
        if not trainer.is_global_zero:  # trainer=fsdp: this rank only helped sample
            return
        self.scores = fidelity_scores(inception, real, fake, seed=self.cfg.seed)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in self.scores.items()})
        for logger in trainer.loggers:
            logger.log_metrics(self.scores, step=trainer.global_step)
        log.info("on %d held-out images: FID %.2f, KID %.4f ± %.4f", real.shape[0], *self.scores.values())

    @torch.no_grad()
    def _images(self, trainer: L.Trainer, module: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out images and a sample for each caption, at the image's size, as uint8."""
        dataset = trainer.datamodule.holdout_dataset()
        data_cfg = trainer.datamodule.cfg
        real, fake = [], []
        with sampling_pipeline(trainer, module, self.cfg.scheduler) as pipe:
            for index, (record, _) in enumerate(trainer.datamodule.holdout):
                image = dataset[(index, 0)]["pixel_values"]  # [-1, 1]
                prompt = f"{data_cfg.caption_prefix}{record.caption or ''}{data_cfg.caption_suffix}"
                generator = torch.Generator("cpu").manual_seed(self.cfg.seed + index)
                sample = pipe(
                    prompt,
                    height=image.shape[1],
                    width=image.shape[2],
                    num_inference_steps=self.cfg.num_inference_steps,
                    guidance_scale=self.cfg.guidance_scale,
                    generator=generator,
                    output_type="pt",
                ).images
                real.append(to_uint8((image[None] + 1) / 2))
                fake.append(to_uint8(sample.float().cpu()))
        # Different bucket sizes: the Inception resizes each to 299 px, so batch them one by one.
        return _stack(real), _stack(fake)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    size = images[0].shape[-2:]
    if all(image.shape[-2:] == size for image in images):
        return torch.cat(images)
    resized = [torch.nn.functional.interpolate(i.float(), size=size, mode="bilinear") for i in images]
    return torch.cat(resized).round().to(torch.uint8)
