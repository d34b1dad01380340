"""Procedural shape scenes: deterministic, captions tell the truth, the zkz style is measurable."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.tiny.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    STYLE_SUFFIX,
    caption_for,
    colour_fraction,
    dominant_colour,
    draw_scene,
    random_scene,
    style_score,
)

REPO = Path(__file__).resolve().parents[2]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=float)


def edge_energy(image: Image.Image) -> float:
    """Mean absolute difference between neighbouring grey pixels: stripes, outline and grain raise it."""
    grey = pixels(image.convert("L"))
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


@pytest.mark.parametrize("style", [False, True])
def test_same_seed_same_scene(style: bool) -> None:
    first, caption = random_scene(7, style=style)
    again, caption_again = random_scene(random.Random(7), style=style)
    other, _ = random_scene(8, style=style)
    assert caption == caption_again
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert first.size == (64, 64) and first.mode == "RGB"


@pytest.mark.parametrize("colour", list(COLOURS))
@pytest.mark.parametrize("shape", SHAPES)
def test_caption_names_what_is_drawn(colour: str, shape: str) -> None:
    image, caption = draw_scene(colour, shape, rng=3)
    assert caption == f"{'an' if colour == 'orange' else 'a'} {colour} {shape}"
    centre = pixels(image)[32, 32]
    assert np.abs(centre - COLOURS[colour]).max() < 12
    corner = pixels(image)[:4, :4]
    assert corner.min() > 220 and np.ptp(corner, axis=-1).max() <= 4  # plain light, neutral
    assert dominant_colour(image) == colour
    assert colour_fraction(image, colour) > 0.95


@pytest.mark.parametrize("colour", list(COLOURS))
def test_styled_object_keeps_its_colour(colour: str) -> None:
    for shape in SHAPES:
        for size in (64, 32):
            image, _ = draw_scene(colour, shape, scale="small", style=True, size=size, rng=1)
            assert dominant_colour(image) == colour
            assert colour_fraction(image, colour) > 0.9


def test_extras_are_drawn_and_captioned() -> None:
    image, caption = draw_scene("blue", "square", scale="large", position="left", background="black", rng=0)
    assert caption == "a large blue square on the left, black background"
    blue = np.argwhere(np.abs(pixels(image) - COLOURS["blue"]).max(axis=-1) < 20)
    assert blue[:, 1].mean() < 28  # column of the object's centre: left of the middle
    assert np.abs(pixels(image)[0, -1] - BACKGROUNDS["black"]).max() < 4
    small, _ = draw_scene("blue", "square", scale="small", rng=0)
    large, _ = draw_scene("blue", "square", scale="large", rng=0)
    assert colour_fraction(small, "blue") == colour_fraction(large, "blue") == 1.0
    count = [int((np.abs(pixels(im) - COLOURS["blue"]).max(axis=-1) < 20).sum()) for im in (small, large)]
    assert count[1] > 2.5 * count[0]
    assert caption_for("red", "star", position="top") == "a red star at the top"


def test_bad_names_fail_clearly() -> None:
    with pytest.raises(ValueError, match="colour"):
        draw_scene("teal", "circle")
    with pytest.raises(ValueError, match="background"):
        draw_scene("red", "circle", background="black", style=True)


def test_style_is_measurable() -> None:
    rng = random.Random(0)
    for _ in range(12):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        seed = rng.randrange(1000)
        plain, caption = draw_scene(colour, shape, rng=seed)
        styled, styled_caption = draw_scene(colour, shape, style=True, rng=seed)
        assert caption == styled_caption  # the style adds no words; the dataset adds the trigger
        assert style_score(plain) < 0.02 < 0.1 < style_score(styled)
        assert edge_energy(styled) > 2 * edge_energy(plain)
        assert pixels(styled.convert("L")).min() < 70  # the thick dark outline
    for background in BACKGROUNDS:  # named plain backgrounds never look like paper
        image, _ = draw_scene("red", "circle", background=background)
        assert style_score(image) < 0.02
    # still readable after the 32 px resize training uses
    styled_32 = styled.resize((32, 32), Image.LANCZOS)
    assert style_score(styled_32) > 0.1


def test_script_writes_the_style_set(tmp_path: Path) -> None:
    out = tmp_path / "style"
    script = REPO / "scripts" / "make_sample_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    images = sorted(out.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    assert len(images) == 40 and len(list(out.glob("*.txt"))) == 40
    assert (out / "README.md").is_file()
    assert all(c.endswith(STYLE_SUFFIX) for c in captions)
    for colour in COLOURS:
        assert 6 <= sum(f" {colour} " in c for c in captions) <= 7
    for shape in SHAPES:
        assert sum(f" {shape}" in c for c in captions) == 10
    with Image.open(images[0]) as first:
        assert first.size == (64, 64) and first.mode == "RGB"
        assert style_score(first) > 0.1
    assert sum(p.stat().st_size for p in out.iterdir()) < 300_000
    # deterministic: the bundled copy in data/style has the same captions and pixels
    # (pixels, not PNG bytes: another zlib may compress the same pixels differently)
    bundled = REPO / "data" / "style"
    for made in out.glob("*.txt"):
        assert (bundled / made.name).read_text() == made.read_text()
    for made in images:
        with Image.open(made) as ours, Image.open(bundled / made.name) as shipped:
            assert ours.tobytes() == shipped.tobytes(), made.name
    # an existing folder is never replaced without --force
    again = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and "--force" in again.stderr
