"""DreamBooth's class images: the base model draws the ones `prior.path` lacks, before training.

Image k (counting what the folder already holds) is drawn with seed `seed + k`, so a set topped up
later matches one drawn at once, and each is saved with its prompt as its caption. A run that finds
enough images draws none. Processes of one run (DDP ranks) take turns under a file lock: the first
draws, the others find the folder full.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from finetune.config.files import atomic_path, save_png
from finetune.config.prior import PriorConfig
from finetune.config.schema import SourceConfig
from finetune.data.images import IMAGE_EXTENSIONS
from finetune.models.loading import load_pipeline
from finetune.models.prompts import pipeline_prompt_encoder, pipeline_text_inputs
from finetune.models.schedules import predicting

log = logging.getLogger(__name__)

LOCK_NAME = ".class_images.lock"


def count_images_missing(prior: PriorConfig) -> int:
    """How many class images `prior.path` lacks to reach `prior.num_images`."""
    folder = Path(str(prior.path)).expanduser()
    return max(0, prior.num_images - (count_images(folder) if folder.is_dir() else 0))


def count_images(folder: Path) -> int:
    """Images anywhere under `folder` (kohya regularisation folders nest them one level down)."""
    return sum(1 for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


# The keys of a source that `data` holds itself when it has no `data.sources`.
_SOURCE_KEYS = (
    "source", "path", "name", "split", "image_column", "caption_column", "file_column", "caption_extensions",
    "conditioning_path", "conditioning_column", "weight", "repeats",
)  # fmt: skip


def with_class_images(data: Any, prior: PriorConfig) -> Any:
    """`data` (a DictConfig) with `prior.path` as one more source, marked `is_reg`, weighted by
    `prior.loss_weight`, uncaptioned images captioned with `prior.prompt`. Captions of class images get
    no prefix or suffix: a trigger word there would teach the class the instance's name."""
    if not prior.path:
        return data
    data = data.copy()
    sources = list(data.sources)
    if not sources:  # the instance images were `data` itself: they become the first source
        sources = [_source({key: data[key] for key in _SOURCE_KEYS})]
        data.path = data.name = None
    reg = {
        "path": prior.path,
        "is_reg": True,
        "loss_weight": prior.loss_weight,
        "default_caption": prior.prompt,
        "caption_prefix": "",
        "caption_suffix": "",
    }
    data.sources = [*sources, _source(reg)]
    return data


def _source(settings: dict[str, Any]) -> Any:
    """A `data.sources` entry with `settings`, typed as the schema types them."""
    return OmegaConf.merge(OmegaConf.structured(SourceConfig), settings)


def ensure_class_images(
    prior: PriorConfig, model_cfg: Any, resolution: int, seed: int, device: str, dtype: torch.dtype
) -> int:
    """Draw the class images `prior.path` lacks (up to `prior.num_images`); returns how many were drawn."""
    folder = Path(str(prior.path)).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        have = count_images(folder)
        missing = prior.num_images - have
        if missing <= 0:
            log.info("prior: %d class images in %s, none to generate", have, folder)
            return 0
        log.info("prior: generating %d class images of '%s' into %s", missing, prior.prompt, folder)
        pipe = load_pipeline(model_cfg, dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        # The base model as it is: its prediction type (if the user corrects it), not the run's new
        # schedule (zero terminal SNR is what the run teaches, not what the base draws with).
        pipe.scheduler = predicting(pipe.scheduler, model_cfg.prediction_type)
        text_side = pipeline_prompt_encoder(pipe, model_cfg.clip_skip)  # as users sample it
        with tqdm(total=missing, desc="class images", unit="image") as bar:
            for start in range(have, prior.num_images, prior.batch_size):
                numbers = list(range(start, min(start + prior.batch_size, prior.num_images)))
                drawn = _draw(pipe, text_side, prior, numbers, resolution, seed)
                for number, image in zip(numbers, drawn, strict=True):
                    _save(folder, number, image, str(prior.prompt))
                bar.update(len(numbers))
        del pipe
    return missing


@torch.no_grad()
def _draw(
    pipe: Any, text_side: Any, prior: PriorConfig, numbers: list[int], resolution: int, seed: int
) -> list[Any]:
    negative = [prior.negative_prompt] * len(numbers) if prior.negative_prompt else None
    text = pipeline_text_inputs(text_side, [str(prior.prompt)] * len(numbers), negative, pipe)
    return pipe(
        **text,
        num_inference_steps=prior.num_inference_steps,
        guidance_scale=prior.guidance_scale,
        height=resolution,
        width=resolution,
        generator=[torch.Generator("cpu").manual_seed(seed + number) for number in numbers],
    ).images


def _save(folder: Path, number: int, image: Any, caption: str) -> None:
    """`class_<number>.png` and its caption; a name the folder already uses gets a suffix."""
    stem, suffix = f"class_{number:05d}", 0
    while (folder / f"{stem}.png").exists() or (folder / f"{stem}.txt").exists():
        suffix += 1
        stem = f"class_{number:05d}_{suffix}"
    with atomic_path(folder / f"{stem}.txt") as tmp:
        tmp.write_text(caption, encoding="utf-8")
    save_png(image, folder / f"{stem}.png")  # last: an image without its caption is never seen


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
