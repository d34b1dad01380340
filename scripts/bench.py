"""Benchmarks (measurements, not tests). Prints a table; run on an otherwise idle machine.

    .venv/bin/python scripts/bench.py data [--images 256] [--size 768x512] [--resolution 512] [--steps 60]
    .venv/bin/python scripts/bench.py train [--model tiny|sd15|sdxl] [--resolution N] [--batch-size N]
        [--method lora|controlnet] [--steps N] [--warmup N] [--precision 32-true|bf16-mixed]
        [--device cpu|cuda] [--cache] [--json PATH]              (`make bench`; details: bench_train.py)

`data`: images/s through decode + bucket fit + augment with 0 and 2 DataLoader workers, on a folder of
generated JPEGs; then training steps/s of the tiny model on the bundled style set with the latent
cache off and on (after the cache is filled, which is timed separately).

`train`: our training (`finetune.train.train`) against a plain reference loop written the way
diffusers' `train_text_to_image_lora.py` trains, in the same process on the same data: steps/s,
images/s, start-up, peak memory, FLOPs per image, MFU on GPU, and our speed as a ratio to it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: never reach the network

import bench_train  # noqa: E402  (beside this file)
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402

from finetune.config.schema import DataConfig  # noqa: E402
from finetune.config.store import CONF_DIR
from finetune.data import CaptionedImageDataModule  # noqa: E402
from finetune.tiny.vocab import build_tokenizer  # noqa: E402
from finetune.train import train  # noqa: E402


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """`count` JPEGs of smooth noise (compresses like a photo, unlike flat colour), with captions."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        coarse = rng.integers(0, 255, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        if index % 3 == 1:  # a third portrait, so buckets have work to do
            image = image.transpose(Image.Transpose.ROTATE_90)
        image.save(folder / f"{index:05d}.jpg", quality=90)
        (folder / f"{index:05d}.txt").write_text(f"photo {index}, noise, test")
    return folder


def decode_rate(folder: Path, resolution: int, workers: int, batch_size: int = 8) -> float:
    """Images per second out of the DataLoader (decode, resize, crop, flip, tensor, tokenize)."""
    cfg = DataConfig(
        path=str(folder), resolution=resolution, buckets=True, batch_size=batch_size, num_workers=workers
    )
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        module = CaptionedImageDataModule(cfg, build_tokenizer(Path(tokenizer_dir)), seed=0)
        module.scan()
        loader = module.train_dataloader()
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += batch["index"].shape[0]
        return images / (time.perf_counter() - start)


class StepTimer(L.Callback):
    """Wall time of the steps after the first `skip` (start-up, first-batch and cache costs excluded).

    Given to the run through the `callbacks` config key, like a user's callback; `StepTimer.last`
    is the instance of the latest run.
    """

    last: StepTimer | None = None

    def __init__(self, skip: int = 5) -> None:
        self.skip, self.start, self.steps, self.elapsed = skip, 0.0, 0, 0.0
        StepTimer.last = self

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.skip and not self.start:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        self.steps = trainer.global_step - self.skip
        self.elapsed = time.perf_counter() - self.start


def training_rate(run_dir: Path, steps: int, cache: str, cache_dir: Path) -> tuple[float, float]:
    """(optimizer steps/s after warm-up, seconds from start to the first step) of `make train`'s recipe."""
    overrides = [
        "experiment=tiny_style",
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "validation.prompts=[]",
        "checkpoint.every_n_steps=100000",
        "logger=none",
        f"data.cache={cache}",
        f"data.cache_dir={cache_dir}",
        "+callbacks.timer._target_=__main__.StepTimer",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    started = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - started
    timer = StepTimer.last
    assert timer is not None and timer.elapsed > 0
    return timer.steps / timer.elapsed, total - timer.elapsed


def bench_data(args: argparse.Namespace) -> None:
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(Path(tmp) / "images", args.images, (width, height))
        print(
            f"decode + augment: {args.images} JPEGs of {width}x{height} -> buckets around {args.resolution}px"
        )
        for workers in (0, 2):
            rate = decode_rate(folder, args.resolution, workers)
            print(f"  num_workers={workers}: {rate:8.1f} images/s")
        print(f"training steps of `make train` (tiny model, batch 4, {args.steps} steps, first 5 not timed)")
        cache_dir = Path(tmp) / "cache"
        for cache in ("none", "disk"):
            rate, overhead = training_rate(Path(tmp) / f"run_{cache}", args.steps, cache, cache_dir)
            print(f"  data.cache={cache:<5} {rate:6.2f} steps/s   start-up and first steps {overhead:5.1f} s")
        rate, overhead = training_rate(Path(tmp) / "run_warm", args.steps, "disk", cache_dir)
        print(f"  data.cache=disk  {rate:6.2f} steps/s   start-up and first steps {overhead:5.1f} s (filled)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="data pipeline and cache")
    data.add_argument("--images", type=int, default=256)
    data.add_argument("--size", default="768x512", help="width x height of the generated images")
    data.add_argument("--resolution", type=int, default=512)
    data.add_argument("--steps", type=int, default=60)
    bench_train.add_arguments(sub.add_parser("train", help="our training vs the reference loop"))
    args = parser.parse_args()
    if args.what == "train":
        return bench_train.main(args)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "finetune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # the table is the output
    bench_data(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
