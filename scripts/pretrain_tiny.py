"""Pretrain the tiny SD-architecture model shipped in data/tiny-sd, from scratch, on drawn shapes.

    .venv/bin/python scripts/pretrain_tiny.py                       # about an hour on 2 CPU cores
    .venv/bin/python scripts/pretrain_tiny.py --images 256 --vae-steps 20 --unet-steps 20 --out /tmp/t

Stages (each skipped when its output already exists in --work, so an interrupted run resumes):
  1. draw --images captioned 32-px scenes with finetune.shapes (`a <colour> <shape>` + extras);
  2. train the AutoencoderKL on them (a small Lightning module below: reconstruction + KL), then set
     its scaling factor to 1 / std of the latents, as SD's 0.18215 was chosen;
  3. assemble the pipeline: that VAE, a seeded random CLIP text encoder (kept frozen: its random
     token features are distinct enough for cross-attention to read), the generated tokenizer,
     a fresh U-Net and the DDPM scheduler;
  4. train the U-Net with the framework itself: `finetune-train method=full` (EMA weights);
  5. copy the exported pipeline folder to --out.
A standalone tool, so plain argparse; the U-Net stage is configured through the Hydra config.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from hydra import compose, initialize_config_dir

from finetune.config import CONF_DIR, DataConfig
from finetune.data import CaptionedImageDataModule
from finetune.shapes import random_scene
from finetune.tiny import build_tiny_pipeline
from finetune.train import train

RESOLUTION = 32
UNET_CHANNELS = (32, 64, 64)
PROMPTS = [
    "a red circle",
    "a blue square",
    "a yellow triangle",
    "a green star",
    "a purple circle on the left",
]


class VaeTrainer(L.LightningModule):
    """Reconstruction (MSE) plus a small KL term keeping the latents near a unit Gaussian."""

    def __init__(self, vae: AutoencoderKL, lr: float, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.lr, self.kl_weight = vae, lr, kl_weight

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pixels = batch["pixel_values"]
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean()
        self.log_dict({"vae/mse": mse, "vae/kl": kl}, prog_bar=True)
        return mse + self.kl_weight * kl

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)


def draw_dataset(folder: Path, count: int, seed: int) -> None:
    """`count` PNG + caption pairs at the model's resolution."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rng = random.Random(seed)
    for index in range(count):
        image, caption = random_scene(rng, size=RESOLUTION, extras=0.5)
        image.save(partial / f"{index:06d}.png")
        (partial / f"{index:06d}.txt").write_text(caption + "\n")
    partial.rename(folder)


def data_module(folder: Path, tokenizer, batch_size: int) -> CaptionedImageDataModule:
    cfg = DataConfig(path=str(folder), resolution=RESOLUTION, random_flip=False, batch_size=batch_size)
    datamodule = CaptionedImageDataModule(cfg, tokenizer)
    datamodule.scan()
    return datamodule


def train_vae(stage: Path, shapes: Path, steps: int, seed: int) -> None:
    """Stage 2 and 3: the VAE, then the whole untrained-U-Net pipeline saved as a diffusers folder."""
    L.seed_everything(seed)
    pipe = build_tiny_pipeline(seed=seed, resolution=RESOLUTION, unet_channels=UNET_CHANNELS)
    datamodule = data_module(shapes, pipe.tokenizer, batch_size=64)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, log_every_n_steps=50
    )
    trainer.fit(VaeTrainer(pipe.vae, lr=1e-3, kl_weight=1e-6), datamodule=datamodule)

    pipe.vae.eval()
    with torch.no_grad():
        batches = [batch["pixel_values"] for batch in islice(datamodule.train_dataloader(), 8)]
        latents = torch.cat([pipe.vae.encode(b).latent_dist.sample() for b in batches])
    pipe.vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    print(f"VAE scaling factor: {pipe.vae.config.scaling_factor}")
    partial = stage.with_name(stage.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(stage)


def train_unet(stage: Path, shapes: Path, run_dir: Path, steps: int, seed: int) -> Path:
    """Stage 4, through the framework's own config and training code."""
    overrides = [
        "method=full",
        "method.ema_decay=0.999",
        "method.save_single_file=false",
        f"model.pretrained={stage}",
        "model.build_tiny=false",
        f"model.resolution={RESOLUTION}",
        "data=folder",
        f"data.path={shapes}",
        "data.batch_size=32",
        "data.random_flip=false",  # captions say "on the left": a flip would contradict them
        "data.caption_dropout=0.1",  # for classifier-free guidance
        "optim.lr=5e-4",
        "optim.scheduler=cosine",
        "optim.warmup_steps=200",
        "optim.weight_decay=0.0",
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=50",
        "trainer.enable_model_summary=false",
        f"validation.every_n_steps={max(steps // 6, 1)}",
        f"validation.prompts=[{','.join(PROMPTS)}]",
        "validation.guidance_scale=4.0",
        f"checkpoint.every_n_steps={max(steps // 6, 1)}",
        "checkpoint.keep_last=2",
        "logger=[tensorboard,csv]",
        "name=pretrain_tiny",
        f"seed={seed}",
        f"run_dir={run_dir}",
    ]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        overrides.append(f"resume={last}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return train(cfg).exported["diffusers"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(".cache/pretrain-tiny"))
    parser.add_argument("--out", type=Path, default=Path("data/tiny-sd"))
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args()
    if args.out.exists() and not args.force:
        print(f"{args.out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    shapes, stage, run_dir = args.work / "shapes", args.work / "untrained-unet", args.work / "unet-run"
    if not shapes.is_dir():
        draw_dataset(shapes, args.images, args.seed)
    if not stage.is_dir():
        train_vae(stage, shapes, args.vae_steps, args.seed)
    exported = run_dir / "model"
    if not exported.is_dir():
        exported = train_unet(stage, shapes, run_dir, args.unet_steps, args.seed)

    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(exported, partial)
    if args.out.exists():
        shutil.rmtree(args.out)
    partial.rename(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
