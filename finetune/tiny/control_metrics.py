"""Does a ControlNet steer the tiny model? Object placement read from pixels, with and without the condition.

Scenes are drawn with a random position and size and captioned with colour and shape only, so only the
conditioning image says where the object goes. For each scene the sample's object mask is compared
with the scene's (intersection over union); the same samples with a blank (all-zero) conditioning
image give the baseline.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from finetune.tiny.metrics import object_mask
from finetune.tiny.scenes import COLOURS, POSITIONS, SCALES, SHAPES, draw_scene


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def control_scenes(count: int, seed: int, size: int = 32) -> list[tuple[Image.Image, str]]:
    """(scene, `a <colour> <shape>`) pairs; position and size vary and are not in the caption."""
    rng = random.Random(seed)
    scenes = []
    for _ in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        scale, position = rng.choice([None, *SCALES]), rng.choice([None, *POSITIONS])
        image, _ = draw_scene(colour, shape, scale=scale, position=position, size=size, rng=rng)
        scenes.append((image, f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"))
    return scenes


@torch.no_grad()
def placement_iou(
    pipe: object,
    scenes: list[tuple[Image.Image, str]],
    condition_of: Callable[[Image.Image], Image.Image],
    *,
    steps: int = 20,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean object-mask IoU between samples and scenes, with the scenes' conditions and with blank ones.

    Scenes are sampled in batches (one generator per scene, so a sample does not depend on the batching)."""
    conditions = [condition_of(scene) for scene, _ in scenes]
    blanks = [Image.new("RGB", condition.size) for condition in conditions]
    results = {}
    for name, images in (("with_condition", conditions), ("blank_condition", blanks)):
        ious = []
        for start in range(0, len(scenes), batch_size):
            batch = range(start, min(start + batch_size, len(scenes)))
            samples = pipe(
                [scenes[i][1] for i in batch],
                image=[images[i] for i in batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=scenes[start][0].height,
                width=scenes[start][0].width,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in batch],
            ).images
            ious += [
                mask_iou(object_mask(sample), object_mask(scenes[i][0]))
                for sample, i in zip(samples, batch, strict=True)
            ]
        results[name] = float(np.mean(ious))
    return results
