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
) -> dict[str, float]:
    """Mean object-mask IoU between samples and scenes, with the scenes' conditions and with blank ones."""
    results = {}
    for name, blank in (("with_condition", False), ("blank_condition", True)):
        ious = []
        for index, (scene, caption) in enumerate(scenes):
            condition = condition_of(scene)
            if blank:
                condition = Image.new("RGB", condition.size)
            sample = pipe(
                caption,
                image=condition,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=scene.height,
                width=scene.width,
                generator=torch.Generator("cpu").manual_seed(seed + index),
            ).images[0]
            ious.append(mask_iou(object_mask(sample), object_mask(scene)))
        results[name] = float(np.mean(ious))
    return results
