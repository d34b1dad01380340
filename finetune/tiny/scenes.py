"""Procedural captioned shape scenes: one coloured shape, a caption that says what was drawn.

They feed the bundled style dataset and the tests. The scenes are simple on purpose: a tiny model can
learn them in minutes at 32 px, and whether a generated image got the colour or the style right can
be read from plain pixel statistics (`colour_fraction`, `dominant_colour`, `style_score`).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# Saturated and far apart in hue (red 0°, orange ~30°, yellow ~54°, green ~133°, blue ~225°,
# purple ~279°), so the nearest hue names the colour even after resizing or a noisy generation.
COLOURS: dict[str, RGB] = {
    "red": (225, 25, 25),
    "orange": (250, 125, 0),
    "yellow": (245, 220, 0),
    "green": (30, 170, 60),
    "blue": (30, 80, 225),
    "purple": (145, 45, 200),
}
SHAPES = ("circle", "square", "triangle", "star")
# Named backgrounds are too dark or too pale to count as vivid, so they never look like an object
# colour; the names are whole words in the tiny model's tokenizer.
BACKGROUNDS: dict[str, RGB] = {"black": (20, 20, 22), "grey": (115, 115, 115), "pink": (245, 200, 230)}
SCALES = {"small": 0.16, "large": 0.28}  # the object's half-extent as a fraction of the image
MEDIUM = 0.22
POSITIONS = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
POSITION_WORDS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
STYLE_SUFFIX = ", in zkz style"  # the trigger phrase every caption of the bundled style set ends with

SUPERSAMPLE = 4
PAPER: RGB = (238, 224, 192)
OUTLINE: RGB = (40, 28, 22)
SHADE = 0.6  # stripe shade = colour * SHADE: same hue, so the object still reads as its colour
VIVID_SATURATION, VIVID_VALUE = 0.35, 0.4


def _rng(rng: random.Random | int | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng or 0)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` about (cx, cy), sized to look as big as a circle of radius `r`."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Centroid on the centre, but nudged down so the triangle looks centred, not top-heavy.
        angles, radii, cy = [-90 + 120 * i for i in range(3)], [1.15 * r] * 3, cy + 0.15 * r
    elif shape == "star":
        angles = [-90 + 36 * i for i in range(10)]
        radii = [1.1 * r if i % 2 == 0 else 0.5 * r for i in range(10)]  # points, then notches
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    rad = np.radians(angles)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, rad, strict=True)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, **kw) -> None:
    """Draw `shape` of size `r` about (cx, cy); `kw` are ImageDraw's fill / outline / width."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), **kw)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), **kw)


def _paper(side: int, size: int, rng: random.Random) -> Image.Image:
    """Warm paper: a slightly varied cream with coarse grain that survives downsampling to 32 px."""
    noise = np.random.default_rng(rng.getrandbits(32))
    tone = np.array(PAPER, dtype=float) + rng.uniform(-4, 4)
    grain = noise.normal(0.0, 6.0, (max(1, size // 2), max(1, size // 2), 1))
    paper = np.clip(tone + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(paper).resize((side, side), Image.NEAREST)


def _stripes(side: int, rgb: RGB) -> Image.Image:
    """Diagonal hatching: bands of the colour and a darker shade of it, size/8 output px per period."""
    period = side / 8
    y, x = np.mgrid[0:side, 0:side]
    light = ((x + y) % period) < period / 2
    shade = np.array(rgb, dtype=float) * SHADE
    fill = np.where(light[..., None], np.array(rgb, dtype=float), shade)
    return Image.fromarray(fill.astype(np.uint8))


def caption_for(
    colour: str,
    shape: str,
    scale: str | None = None,
    position: str | None = None,
    background: str | None = None,
) -> str:
    """`a [small|large] <colour> <shape>[ on the left…][, <background> background]` (`an orange …`)."""
    words = [w for w in (scale, colour, shape, POSITION_WORDS[position] if position else None) if w]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return f"{text}, {background} background" if background else text


def draw_scene(
    colour: str,
    shape: str,
    *,
    scale: str | None = None,
    position: str | None = None,
    background: str | None = None,
    style: bool = False,
    size: int = 64,
    rng: random.Random | int | None = None,
) -> tuple[Image.Image, str]:
    """Draw one scene; return (RGB image of `size` px, caption). Same rng/seed -> same pixels.

    `scale` is small/large (None: medium), `position` one of POSITIONS (None: center, unmentioned),
    `background` one of BACKGROUNDS (None: plain light). `style=True` renders the zkz style: hatched
    fill, thick dark outline, warm paper background (so it cannot be combined with `background`).
    """
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"colour must be one of {list(COLOURS)} and shape one of {SHAPES}")
    if scale not in (None, *SCALES) or position not in (None, *POSITIONS):
        raise ValueError(f"scale must be one of {list(SCALES)}, position one of {list(POSITIONS)}")
    if background is not None and (style or background not in BACKGROUNDS):
        raise ValueError(f"background must be one of {list(BACKGROUNDS)} and needs style=False")
    rng = _rng(rng)
    side = size * SUPERSAMPLE
    r = SCALES.get(scale, MEDIUM)
    fx, fy = POSITIONS[position or "center"]
    # A little jitter, then clamp so the whole object (stars reach 1.1 r) and outline stay in frame.
    lo = 1.1 * r + 0.03
    fx, fy = (min(max(f + rng.uniform(-0.03, 0.03), lo), 1 - lo) for f in (fx, fy))
    cx, cy, rad = fx * side, fy * side, r * side

    if style:
        canvas = _paper(side, size, rng)
    else:
        grey = rng.randint(228, 250)
        canvas = Image.new("RGB", (side, side), BACKGROUNDS[background] if background else (grey,) * 3)
    mask = Image.new("L", (side, side), 0)
    draw_shape(ImageDraw.Draw(mask), shape, cx, cy, rad, fill=255)
    rgb = COLOURS[colour]
    fill = _stripes(side, rgb) if style else Image.new("RGB", (side, side), rgb)
    canvas.paste(fill, (0, 0), mask)
    if style:
        draw_shape(
            ImageDraw.Draw(canvas),
            shape,
            cx,
            cy,
            rad,
            outline=OUTLINE,
            width=round(side * min(0.045, 0.22 * r)),
        )  # thinner on small objects
    image = canvas.resize((size, size), Image.LANCZOS)
    return image, caption_for(colour, shape, scale, position, background)


def random_scene(
    rng: random.Random | int | None = None,
    *,
    colour: str | None = None,
    shape: str | None = None,
    style: bool = False,
    size: int = 64,
    extras: float = 0.5,
) -> tuple[Image.Image, str]:
    """A scene with random colour/shape (unless given); each extra is added with probability `extras`."""
    rng = _rng(rng)
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    scale = rng.choice(list(SCALES)) if rng.random() < extras else None
    position = rng.choice(list(POSITIONS)) if rng.random() < extras else None
    background = rng.choice(list(BACKGROUNDS)) if not style and rng.random() < extras else None
    return draw_scene(
        colour, shape, scale=scale, position=position, background=background, style=style, size=size, rng=rng
    )


def _colour_index(image: Image.Image) -> np.ndarray:
    """Per pixel: index into COLOURS of the nearest hue, or -1 where the pixel is not vivid."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=float) / 255.0
    hues = np.array([_hue(rgb) for rgb in COLOURS.values()])
    diff = np.abs(hsv[..., :1] - hues)
    nearest = np.minimum(diff, 1.0 - diff).argmin(axis=-1)
    vivid = (hsv[..., 1] >= VIVID_SATURATION) & (hsv[..., 2] >= VIVID_VALUE)
    return np.where(vivid, nearest, -1)


def _hue(rgb: RGB) -> float:
    pixel = Image.new("RGB", (1, 1), rgb).convert("HSV")
    return pixel.getpixel((0, 0))[0] / 255.0


def colour_fraction(image: Image.Image, colour: str) -> float:
    """Fraction of the vivid pixels whose hue is nearest to `colour` (0.0 if none are vivid)."""
    index = _colour_index(image)
    vivid = index >= 0
    return float((index[vivid] == list(COLOURS).index(colour)).mean()) if vivid.any() else 0.0


def dominant_colour(image: Image.Image) -> str | None:
    """The COLOURS name most vivid pixels are nearest to, or None when nothing is vivid."""
    index = _colour_index(image)
    counts = np.bincount(index[index >= 0], minlength=len(COLOURS))
    return list(COLOURS)[int(counts.argmax())] if counts.any() else None


def style_score(image: Image.Image) -> float:
    """How yellow-warm the image border is ((R+G)/2 - B, 0..1): ~0.15 on zkz paper, <= ~0.01 plain.

    The border is background in every scene, and a warm tint is the first thing a small model
    learns of the style; a median ignores stray object pixels and zero-mean noise.
    """
    px = np.asarray(image.convert("RGB"), dtype=float)
    w = max(1, px.shape[0] // 16)
    ring = np.concatenate(
        [px[:w].reshape(-1, 3), px[-w:].reshape(-1, 3), px[:, :w].reshape(-1, 3), px[:, -w:].reshape(-1, 3)]
    )
    return float(np.median((ring[:, 0] + ring[:, 1]) / 2 - ring[:, 2]) / 255.0)
