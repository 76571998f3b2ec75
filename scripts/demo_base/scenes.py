"""Procedurally drawn scenes with captions: one coloured shape on a plain background, at a named place.

Everything is drawn with PIL (`lora_gui.demo.draw_scene`, which draws the demo's new concept too), so the demo
base model needs no downloaded data. A scene is a pure function of its seed, and its caption says what it shows,
e.g. "a red circle on a blue background, on the left".
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for lora_gui
from lora_gui.demo import BACKGROUNDS, POSITIONS, SCENE_COLORS, SHAPES, Scene, draw_scene, paint_shape


def random_scene(rng: random.Random) -> Scene:
    shape = rng.choice(SHAPES)
    background = rng.choice(list(BACKGROUNDS))
    color = rng.choice([name for name in SCENE_COLORS if name != background])
    return Scene(shape, color, background, rng.choice(list(POSITIONS)))


def captioned_scene(seed: int, size: int = 64) -> tuple[Image.Image, str]:
    """Scene `seed`: its picture and a caption that sometimes leaves out the background or the place."""
    rng = random.Random(seed)
    scene = random_scene(rng)
    caption = scene.caption(with_background=rng.random() > 0.1, with_position=rng.random() > 0.1)
    return draw_scene(scene, size, rng), caption


def codec_picture(seed: int, size: int = 64) -> Image.Image:
    """A picture for the VAE alone: one to three rectangles, discs and triangles of any colour, size and aspect,
    on a background of any colour. The VAE is the model's codec: it must draw shapes and colours the UNet was
    never taught (the demo's pink cross), or a LoRA could not teach them either."""
    rng = random.Random(seed)
    big = size * 4  # drawn larger, then shrunk, as draw_scene does
    image = Image.new("RGB", (big, big), tuple(rng.randrange(256) for _ in range(3)))
    paint = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        width, height = big * rng.uniform(0.1, 0.8), big * rng.uniform(0.1, 0.8)
        left, top = rng.uniform(-0.1, 0.9) * big, rng.uniform(-0.1, 0.9) * big
        box = (left, top, left + width, top + height)
        fill = tuple(rng.randrange(256) for _ in range(3))
        paint_shape(paint, rng.choice(("square", "circle", "triangle")), box, fill)
    return image.resize((size, size), Image.Resampling.BOX)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/scenes.png"
    sheet = Image.new("RGB", (8 * 64, 4 * 64))
    for index in range(32):
        picture, text = captioned_scene(index)
        sheet.paste(picture, ((index % 8) * 64, (index // 8) * 64))
        print(index, text)
    sheet.save(out)
    print(out)
