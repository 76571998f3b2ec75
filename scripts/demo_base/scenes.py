"""Procedurally drawn scenes with captions: one coloured shape on a plain background, at a named place.

Everything is drawn here with PIL, so the demo base model needs no downloaded data. A scene is a pure
function of its seed, and its caption says what it shows, e.g. "a red circle on a blue background, on the left".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 130, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {
    "white": (235, 235, 230),
    "black": (25, 25, 30),
    "gray": (128, 128, 128),
    "blue": (50, 90, 200),
    "green": (50, 150, 70),
    "yellow": (230, 205, 60),
}
# Where the shape's centre is, as fractions of the picture, and how a caption says it.
POSITIONS = {
    "left": ((0.27, 0.5), "on the left"),
    "right": ((0.73, 0.5), "on the right"),
    "top": ((0.5, 0.27), "at the top"),
    "bottom": ((0.5, 0.73), "at the bottom"),
    "center": ((0.5, 0.5), "in the center"),
}
_OVERSAMPLE = 4  # drawn this many times larger, then shrunk: smooth edges without PIL's aliasing


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    position: str

    def caption(self, with_background: bool = True, with_position: bool = True) -> str:
        text = f"a {self.color} {self.shape}"
        if with_background:
            text += f" on a {self.background} background"
        if with_position:
            text += f", {POSITIONS[self.position][1]}"
        return text


def random_scene(rng: random.Random) -> Scene:
    shape = rng.choice(SHAPES)
    background = rng.choice(list(BACKGROUNDS))
    color = rng.choice([name for name in COLORS if name != background])
    return Scene(shape, color, background, rng.choice(list(POSITIONS)))


def draw(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """The scene as a `size` px square picture; `rng` jitters the shape's size and place a little."""
    rng = rng or random.Random(0)
    big = size * _OVERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    (fx, fy), _ = POSITIONS[scene.position]
    side = big * rng.uniform(0.34, 0.44)
    cx = big * (fx + rng.uniform(-0.05, 0.05))
    cy = big * (fy + rng.uniform(-0.05, 0.05))
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill = COLORS[scene.color]
    paint = ImageDraw.Draw(image)
    if scene.shape == "circle":
        paint.ellipse(box, fill=fill)
    elif scene.shape == "square":
        paint.rectangle(box, fill=fill)
    else:
        paint.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def captioned_scene(seed: int, size: int = 64) -> tuple[Image.Image, str]:
    """Scene `seed`: its picture and a caption that sometimes leaves out the background or the place."""
    rng = random.Random(seed)
    scene = random_scene(rng)
    caption = scene.caption(with_background=rng.random() > 0.1, with_position=rng.random() > 0.1)
    return draw(scene, size, rng), caption


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/scenes.png"
    sheet = Image.new("RGB", (8 * 64, 4 * 64))
    for index in range(32):
        picture, text = captioned_scene(index)
        sheet.paste(picture, ((index % 8) * 64, (index // 8) * 64))
        print(index, text)
    sheet.save(out)
    print(out)
