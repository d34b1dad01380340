"""The `prior` config: DreamBooth prior preservation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.config.errors import ConfigError


@dataclass
class PriorConfig:
    """DreamBooth prior preservation (kohya's regularisation images, diffusers' `--with_prior_preservation`):
    images of the class train beside the instance images, their loss weighted by `loss_weight`, so that
    the class prompt keeps drawing what the base model drew. On when `path` is set."""

    # Folder of class images with their captions; a kohya regularisation folder (`<repeats>_<class>/`)
    # works too. Generated images are added here.
    path: str | None = None
    # The class prompt, e.g. "a photo of a dog": what generates them, and the caption of those without one
    prompt: str | None = None
    # Generate with the base model, before training, until `path` holds this many (0: use what is there)
    num_images: int = 0
    loss_weight: float = 1.0  # kohya's prior_loss_weight
    # How the class images are generated (at data.resolution, image k with seed `seed` + k)
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    batch_size: int = 4


def check_prior(prior: PriorConfig) -> None:
    """What a prior-preservation run needs, named before any model loads."""
    if prior.num_images and not prior.path:
        raise ConfigError("prior.num_images: set prior.path, the folder the class images go to")
    if prior.num_images and not prior.prompt:
        raise ConfigError("prior.prompt: the class prompt is needed to generate prior.num_images images")
    if prior.path and not prior.num_images and not Path(prior.path).expanduser().is_dir():
        raise ConfigError(f"prior.path: '{prior.path}' is not a folder (set prior.num_images to fill one)")
