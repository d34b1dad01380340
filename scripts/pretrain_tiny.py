"""Pretrain the tiny SD-architecture model shipped in data/tiny-sd, from scratch, on drawn shapes.

    .venv/bin/python scripts/pretrain_tiny.py                       # about an hour on 2 CPU cores
    .venv/bin/python scripts/pretrain_tiny.py --images 256 --vae-steps 20 --unet-steps 20 --out /tmp/t

Stages (1-3 skipped when their output already exists in --work, 4 resumes from its last checkpoint,
so an interrupted run picks up where it stopped):
  1. draw --images captioned 32-px scenes with finetune.tiny.scenes (`a <colour> <shape>` + extras);
  2. train the AutoencoderKL (a small Lightning module below: reconstruction + KL) on those scenes
     mixed half and half with `varied_scene`s: random backgrounds, fills, stripes and outlines. SD's
     VAE saw every kind of picture; ours must too, or styles the U-Net never saw (and that a LoRA
     should learn) could not even be decoded. Then set its scaling factor to 1 / std of the latents,
     as SD's 0.18215 was chosen;
  3. assemble the pipeline: that VAE, a seeded random CLIP text encoder (kept frozen: its random
     token features are distinct enough for cross-attention to read), the generated tokenizer,
     a fresh U-Net and the DDPM scheduler;
  4. train the U-Net with the framework itself: `finetune-train method=full` (EMA weights);
  5. copy the exported pipeline folder to --out.
A standalone tool, so plain argparse; the U-Net stage is configured through the Hydra config.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from finetune.config.schema import DataConfig
from finetune.config.store import CONF_DIR
from finetune.data import CaptionedImageDataModule
from finetune.tiny.builder import build_tiny_pipeline
from finetune.tiny.scenes import SHAPES, draw_shape, random_scene
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

    def __init__(self, vae: AutoencoderKL, lr: float, kl_weight: float, steps: int) -> None:
        super().__init__()
        self.vae, self.lr, self.kl_weight, self.steps = vae, lr, kl_weight, steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pixels = batch["pixel_values"]
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean()
        self.log_dict({"vae/mse": mse, "vae/kl": kl}, prog_bar=True)
        return mse + self.kl_weight * kl

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)
        # Cosine to a tenth: the late, small steps sharpen edges and fine texture.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps, eta_min=self.lr / 10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _random_rgb(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _background(side: int, rng: random.Random) -> Image.Image:
    """A solid colour, a two-colour gradient, or a tone with grain of random strength and size."""
    kind = rng.choice(("solid", "gradient", "grain"))
    if kind == "solid":
        return Image.new("RGB", (side, side), _random_rgb(rng))
    noise = np.random.default_rng(rng.getrandbits(32))
    if kind == "gradient":
        a, b = np.array(_random_rgb(rng), float), np.array(_random_rgb(rng), float)
        t = np.linspace(0, 1, side)[:, None, None]
        ramp = np.broadcast_to(a + (b - a) * t, (side, side, 3))
        return Image.fromarray(np.ascontiguousarray(np.rot90(ramp, rng.randrange(4))).astype(np.uint8))
    cell = rng.choice((2, 4, 8))
    grain = noise.normal(0.0, rng.uniform(2, 20), (side // cell, side // cell, 1))
    tone = np.clip(np.array(_random_rgb(rng), float) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(tone).resize((side, side), Image.NEAREST)


def _fill(side: int, rng: random.Random) -> Image.Image:
    """A solid colour, or stripes of two colours at a random angle and period."""
    first = _random_rgb(rng)
    if rng.random() < 0.4:
        return Image.new("RGB", (side, side), first)
    second = _random_rgb(rng) if rng.random() < 0.5 else tuple(int(c * rng.uniform(0.3, 0.8)) for c in first)
    angle, period = rng.uniform(0, math.pi), rng.uniform(side / 24, side / 5)
    y, x = np.mgrid[0:side, 0:side]
    bands = ((x * math.cos(angle) + y * math.sin(angle)) % period) < period / 2
    return Image.fromarray(np.where(bands[..., None], first, second).astype(np.uint8))


def varied_scene(rng: random.Random, size: int = RESOLUTION) -> Image.Image:
    """1-3 shapes with random fills and outlines on a random background: variety for the VAE only."""
    side = size * 4  # drawn large, then reduced: smooth edges as in the captioned scenes
    canvas = _background(side, rng)
    for _ in range(rng.randint(1, 3)):
        shape, r = rng.choice(SHAPES), rng.uniform(0.08, 0.35) * side
        cx, cy = rng.uniform(0.1, 0.9) * side, rng.uniform(0.1, 0.9) * side
        mask = Image.new("L", (side, side), 0)
        draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, fill=255)
        canvas.paste(_fill(side, rng), (0, 0), mask)
        if rng.random() < 0.5:
            ink = _random_rgb(rng) if rng.random() < 0.5 else (rng.randrange(64),) * 3
            width = max(1, round(rng.uniform(0.01, 0.06) * side))
            draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r, outline=ink, width=width)
    return canvas.resize((size, size), Image.LANCZOS)


class VariedScenes(Dataset):
    """`count` varied scenes drawn on demand; item i is the same image on every call (seeded by i)."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = varied_scene(random.Random(self.seed * 1_000_003 + index))
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"pixel_values": pixels}


class PixelsOnly(Dataset):
    """The pixel tensors of a captioned dataset (the VAE has no use for the captions)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.dataset[index]["pixel_values"]}


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
    datamodule.setup("fit")
    scenes = PixelsOnly(datamodule.dataset)
    mixed = ConcatDataset([scenes, VariedScenes(len(scenes), seed)])
    loader = DataLoader(mixed, batch_size=64, shuffle=True, num_workers=1, persistent_workers=True)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, log_every_n_steps=50
    )
    trainer.fit(VaeTrainer(pipe.vae, lr=1e-3, kl_weight=1e-6, steps=steps), train_dataloaders=loader)

    pipe.vae.eval()
    with torch.no_grad():  # the scale that gives the U-Net's training data (captioned scenes) unit std
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
    parser.add_argument("--vae-steps", type=int, default=2000)
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
    # Always entered: it resumes from the last checkpoint, so a finished run just exports again and a
    # larger --unet-steps continues training (the cosine schedule is stretched to the new length).
    shutil.rmtree(run_dir / "model", ignore_errors=True)  # this script's own earlier export
    exported = train_unet(stage, shapes, run_dir, args.unet_steps, args.seed)

    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(exported, partial)
    card = args.out / "README.md"
    if card.is_file():  # the model card is written by hand: keep it, but its numbers are now stale
        shutil.copy2(card, partial / "README.md")
        print(f"kept {card}: update its measured numbers (scripts/eval_tiny.py)")
    if args.out.exists():
        shutil.rmtree(args.out)
    partial.rename(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
