"""Pixel metrics for generated shape scenes: which colour and shape was drawn, and how zkz-styled it is.

Samples of the tiny model are 32 px and blurry, so every metric works on a small analysis image
(`analysis_image`: the input reduced to at most 32 px) and uses only coarse, scale-free geometry
(fill of the bounding box, convex-hull solidity, how bottom-heavy the object is) and coarse style
cues (warm border, dark outline, diagonal hatching). The thresholds were calibrated on scenes drawn
by `finetune.tiny.scenes` at 32 px, plain and styled, over all sizes, positions and backgrounds.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

import numpy as np
from PIL import Image

from finetune.tiny.scenes import COLOURS, SHAPES, dominant_colour, style_score

ANALYSIS_SIZE = 32  # the tiny model's sample size; larger inputs are reduced to it
MIN_CONTRAST = 40.0  # RGB distance from the background below which a pixel is never object
MIN_OBJECT_PIXELS = 6
# Cuts inside the gaps between the class ranges measured on 1200 drawn 32-px scenes (plain and
# styled, every size, position and background); each sits nearer the side that blur and noise erode.
TRIANGLE_MAX_TOP_HEAVINESS = 0.53  # triangles 0.28-0.47, every other shape >= 0.57
STAR_MAX_SOLIDITY = 0.80  # stars 0.54-0.70, circles/squares >= 0.89
SQUARE_MIN_EXTENT = 0.91  # circles 0.72-0.88, squares >= 0.96 (noise frays a square's edges)
SPREAD_FLOOR = 0.02  # per-feature floor on the style set's spread, so no feature divides by ~0
STYLE_FEATURES = ("warmth", "outline", "hatching")  # the columns of `style_features`


def analysis_image(image: Image.Image) -> Image.Image:
    """`image` as RGB with its longer side reduced to at most ANALYSIS_SIZE px (the metrics' scale)."""
    image = image.convert("RGB")
    scale = ANALYSIS_SIZE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
    return image


def _border(px: np.ndarray) -> np.ndarray:
    """The one-pixel frame of an [H, W, C] array as [N, C] (background in every scene)."""
    return np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Threshold that best splits `values` into two groups (Otsu's between-class variance)."""
    if np.ptp(values) == 0:  # one level only: nothing to split (a blank image)
        return float(values.max())
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mass = np.cumsum(hist * centres)
    total_w, total_m = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_lo = mass / weight
        mean_hi = (total_m - mass) / (total_w - weight)
        between = weight * (total_w - weight) * (mean_lo - mean_hi) ** 2
    return float(edges[1:][int(np.nanargmax(between[:-1]))])


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx) with False shifted in."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in `mask` (the frame counts as outside)."""
    out = mask.copy()
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        out &= _shift(mask, dy, dx)
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The biggest 4-connected region: drops specks of noise that differ from the background."""
    # A plain BFS: the analysis image has at most 32x32 pixels, and numpy/torch have no labelling.
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    label, best, best_size = 0, 0, 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start], queue, size = label, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every pixel that the frame cannot reach without crossing it."""
    outside = np.zeros_like(mask)
    outside[[0, -1], :] = ~mask[[0, -1], :]
    outside[:, [0, -1]] |= ~mask[:, [0, -1]]
    while True:
        grown = outside.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            grown |= _shift(outside, dy, dx)
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


def object_mask(image: Image.Image) -> np.ndarray:
    """Bool mask (on `analysis_image(image)`) of the main object: pixels far from the border's colour.

    The background is the median colour of the frame; the cut between background and object is
    Otsu's threshold on the distance to it (never below MIN_CONTRAST), so it adapts to blurry
    samples. Only the largest connected region is kept, with its holes filled.
    """
    px = np.asarray(analysis_image(image), dtype=float)
    distance = np.linalg.norm(px - np.median(_border(px), axis=0), axis=-1)
    mask = distance > max(MIN_CONTRAST, _otsu(distance))
    if not mask.any():
        return mask
    return _fill_holes(_largest_component(mask))


def colour_of(image: Image.Image) -> str | None:
    """The COLOURS name of the main object (vivid hues inside its mask), or None if nothing is vivid."""
    small = analysis_image(image)
    mask = object_mask(small)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return dominant_colour(small)
    pixels = np.asarray(small)[mask][None]  # a 1xN image of the object's pixels
    return dominant_colour(Image.fromarray(pixels))


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (monotone chain over their corners)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    points = sorted(set(map(tuple, corners.tolist())))

    def half(seq: list) -> list:
        chain: list = []
        for p in seq:
            while len(chain) >= 2:
                (ox, oy), (ax, ay) = chain[-2], chain[-1]
                if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(points) + half(points[::-1]), dtype=float)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Scale-free geometry of a mask: bounding-box `extent`, hull `solidity`, `top_heaviness`."""
    ys, xs = np.nonzero(mask)
    # Extent ignores spurs (pixels with < 2 of 4 neighbours): resampling ringing along a square's
    # sides leaves single pixels that would widen its bounding box by one row at 32 px.
    neighbours = sum(_shift(mask, dy, dx).astype(int) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)))
    body = mask & (neighbours >= 2) if (mask & (neighbours >= 2)).any() else mask
    by, bx = np.nonzero(body)
    middle = (ys.min() + ys.max() + 1) / 2
    top, bottom = (ys + 0.5 < middle).sum(), (ys + 0.5 > middle).sum()
    return {
        "extent": len(by) / ((np.ptp(by) + 1) * (np.ptp(bx) + 1)),
        "solidity": len(ys) / _hull_area(mask),
        "top_heaviness": float(top / max(bottom, 1)),  # an upright triangle is ~1/3, the rest ~1
    }


def shape_of(image: Image.Image) -> str | None:
    """The main object's shape among SHAPES, or None when there is no object to measure."""
    mask = object_mask(image)
    if mask.sum() < MIN_OBJECT_PIXELS or mask.mean() > 0.9:
        return None
    f = shape_features(mask)
    if f["top_heaviness"] < TRIANGLE_MAX_TOP_HEAVINESS:
        return "triangle"
    if f["solidity"] < STAR_MAX_SOLIDITY:
        return "star"
    return "square" if f["extent"] >= SQUARE_MIN_EXTENT else "circle"


def style_features(image: Image.Image) -> np.ndarray:
    """[warmth, outline, hatching] in ~[0, 1]: each ~0 on plain scenes and clearly > 0 in zkz style.

    warmth: the border's yellow tint (`shapes.style_score`); outline: how much darker the mask's
    rim is than both the background and the object's inside (a blend of the two never is);
    hatching: diagonal-difference energy inside the object along the stripes' normal (1, 1) minus
    that along the stripes (1, -1), which cancels for flat fills, noise and symmetric edges.
    """
    small = analysis_image(image)
    value = np.asarray(small, dtype=float).max(axis=-1) / 255.0  # HSV value: the outline is dark
    mask = object_mask(small)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return np.array([style_score(small), 0.0, 0.0])
    inner = _erode(mask)
    rim = mask & ~inner
    core = next(m for m in (_erode(inner), inner, mask) if m.any())  # small objects have no core
    background = float(np.median(_border(value)))
    outline = min(background, float(np.median(value[core]))) - float(np.percentile(value[rim], 25))
    pairs_main = inner[:-1, :-1] & inner[1:, 1:]  # (y, x) and (y + 1, x + 1) both inside
    pairs_anti = inner[:-1, 1:] & inner[1:, :-1]  # (y, x + 1) and (y + 1, x)
    main = np.abs(value[:-1, :-1] - value[1:, 1:])[pairs_main]
    anti = np.abs(value[:-1, 1:] - value[1:, :-1])[pairs_anti]
    hatching = (main.mean() if main.size else 0.0) - (anti.mean() if anti.size else 0.0)
    return np.array([style_score(small), max(outline, 0.0), max(hatching, 0.0)])


def _feature_matrix(images: Sequence[Image.Image]) -> np.ndarray:
    if not images:
        raise ValueError("style_strength needs at least one image in each set")
    return np.stack([style_features(image) for image in images])


def style_strength(
    base_images: Sequence[Image.Image],
    lora_images: Sequence[Image.Image],
    style_images: Sequence[Image.Image],
) -> float:
    """How far the LoRA moved samples from the base model's towards the style set: 1 - d_lora / d_base.

    d_X = || (mean f(X) - mean f(style)) / spread ||_2, with f = `style_features` and spread the style
    set's per-feature standard deviation (at least SPREAD_FLOOR). So 0 = no change from the base,
    1 = the LoRA samples' feature means equal the style set's, < 0 = further from the style than the
    base. If the base already matches the style (d_base ~ 0), the result is 1 - d_lora / 1e-6.
    """
    style = _feature_matrix(style_images)
    centre, spread = style.mean(axis=0), np.maximum(style.std(axis=0), SPREAD_FLOOR)

    def distance(images: Sequence[Image.Image]) -> float:
        return float(np.linalg.norm((_feature_matrix(images).mean(axis=0) - centre) / spread))

    return 1.0 - distance(lora_images) / max(distance(base_images), 1e-6)


_WORD = re.compile(r"[a-z]+")


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(colour, shape) named in `a [size] <colour> <shape>[ where][, anything]`; ValueError otherwise."""
    words = _WORD.findall(prompt.lower().split(",")[0])
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        raise ValueError(f"prompt {prompt!r} names no colour of {list(COLOURS)} and shape of {SHAPES}")
    return colour, shape


def adherence(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """{'colour': accuracy, 'shape': accuracy, 'count': n}: images vs the colour/shape each prompt names."""
    if len(images) != len(prompts) or not images:
        raise ValueError(
            f"need one prompt per image and at least one image ({len(images)} vs {len(prompts)})"
        )
    wanted = [parse_prompt(p) for p in prompts]
    colour_hits = [colour_of(im) == c for im, (c, _) in zip(images, wanted, strict=True)]
    shape_hits = [shape_of(im) == s for im, (_, s) in zip(images, wanted, strict=True)]
    return {"colour": float(np.mean(colour_hits)), "shape": float(np.mean(shape_hits)), "count": len(images)}
