"""A small generated image set with captions, so the demo needs no download and no photos."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 200, 40)}


def draw_shape(shape: str, color: tuple[int, int, int], size: tuple[int, int], seed: int) -> Image.Image:
    """A colored shape on a soft striped background: simple, but not trivially flat."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, (245, 240, 230))
    draw = ImageDraw.Draw(image)
    for y in range(0, height, 16):
        tone = 225 + rng.randint(-12, 12)
        draw.rectangle((0, y, width, y + 7), fill=(tone, tone - 5, tone - 15))
    side = min(width, height) * rng.uniform(0.45, 0.65)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    return image


def write_demo_dataset(folder: str | Path, count: int = 8, size: tuple[int, int] = (160, 160)) -> Path:
    """`count` images with same-name .txt captions, such as "a photo of a red circle"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colors = list(COLORS.items())
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        color_name, color = colors[index % len(colors)]
        draw_shape(shape, color, size, seed=index).save(folder / f"demo_{index:02d}.png")
        (folder / f"demo_{index:02d}.txt").write_text(f"a photo of a {color_name} {shape}\n", encoding="utf-8")
    return folder
