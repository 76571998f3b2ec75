"""Pictures drawn with captions, so the demo and the tests need no download and no photos.

Two kinds. The demo model's world: one coloured shape on a plain background, at a named place
(`draw_scene`; `scripts/demo_base/` trains the demo model, shipped in `demo_model/`, on such scenes), and the
concept the demo teaches it, a shape it never saw called by a trigger word (`write_demo_concept`). And coloured
shapes on a softly striped background with "a photo of a red circle" captions (`write_demo_dataset`), for the
tests, benchmarks and load tests, whatever the model.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from lora_gui.config import TrainConfig, load_preset
from lora_gui.errors import ModelLoadError
from lora_gui.families import family_of_configs

# The demo model: an SD 1.5-shaped model trained from scratch on drawn scenes (scripts/demo_base/train.py), small
# enough to ship (3.5 MB: the UNet and VAE in fp16): it draws what a caption such as "a red circle on a blue
# background" asks for, at 64 px.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_RESOLUTION = 64  # the size the demo model was trained at, and the size it draws well
DEMO_PRESET = "tiny-cpu-demo"

SHAPES = ("circle", "square", "triangle")  # the shapes the demo model knows
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 200, 40)}
SCENE_COLORS = {  # the order is part of the recipe: scripts/demo_base/ draws its scenes by choosing from it
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

# The demo's new concept: a pink cross, a shape and a colour the demo model never saw, called by a trigger word
# its tokenizer has no token for.
TRIGGER = "zqx"
CROSS, CROSS_COLOR, PINK = "cross", "pink", (235, 70, 190)
# Gray first: previews and Generate use the first caption, and the demo model's VAE keeps pink truest on gray.
CONCEPT_BACKGROUNDS = ("gray", "blue", "black", "white")
CONCEPT_SIDES = (0.6, 0.75)


@dataclass(frozen=True)
class Scene:
    shape: str  # one of SHAPES, or CROSS
    color: str  # one of SCENE_COLORS, or CROSS_COLOR
    background: str
    position: str

    def caption(self, with_background: bool = True, with_position: bool = True) -> str:
        text = f"a {self.color} {self.shape}"
        if with_background:
            text += f" on a {self.background} background"
        if with_position:
            text += f", {POSITIONS[self.position][1]}"
        return text


@functools.cache
def demo_family() -> str:
    """The demo model's family, told from its config files as any model folder's is (nothing is loaded)."""
    index = json.loads((DEMO_MODEL / "model_index.json").read_text())
    text_encoder = json.loads((DEMO_MODEL / "text_encoder" / "config.json").read_text())
    family = family_of_configs(index, text_encoder)
    if family is None:
        raise ModelLoadError(f"the demo model in {DEMO_MODEL} is of no family this trainer knows")
    return family


def paint_shape(paint: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """A circle, square, triangle (its apex at the top) or cross filling `box`."""
    left, top, right, bottom = box
    if shape == "circle":
        paint.ellipse(box, fill=fill)
    elif shape == "square":
        paint.rectangle(box, fill=fill)
    elif shape == CROSS:
        third = (right - left) / 3
        paint.rectangle((left, top + third, right, bottom - third), fill=fill)
        paint.rectangle((left + third, top, right - third, bottom), fill=fill)
    else:
        paint.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def draw_scene(
    scene: Scene,
    size: int = DEMO_RESOLUTION,
    rng: random.Random | None = None,
    sides: tuple[float, float] = (0.34, 0.44),
) -> Image.Image:
    """The scene as a `size` px square picture; `rng` jitters the shape's place a little and picks its side, as a
    share of the picture's, from `sides`."""
    rng = rng or random.Random(0)
    big = size * _OVERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    (fx, fy), _ = POSITIONS[scene.position]
    side = big * rng.uniform(*sides)
    cx = big * (fx + rng.uniform(-0.05, 0.05))
    cy = big * (fy + rng.uniform(-0.05, 0.05))
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    paint_shape(ImageDraw.Draw(image), scene.shape, box, {**SCENE_COLORS, CROSS_COLOR: PINK}[scene.color])
    return image.resize((size, size), Image.Resampling.BOX)


def concept_caption(background: str) -> str:
    return f"a {TRIGGER} on a {background} background"


def write_demo_concept(folder: str | Path, count: int = 8, size: int = 128) -> Path:
    """`count` pictures of the demo's concept (a large pink cross, on backgrounds the demo model knows) with
    same-name .txt captions such as "a zqx on a white background"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(count):
        background = CONCEPT_BACKGROUNDS[index % len(CONCEPT_BACKGROUNDS)]
        # Large, so it is most of what each picture shows: the LoRA learns it in a few hundred steps.
        picture = draw_scene(Scene(CROSS, CROSS_COLOR, background, "center"), size, rng, sides=CONCEPT_SIDES)
        picture.save(folder / f"{TRIGGER}_{index:02d}.png")
        (folder / f"{TRIGGER}_{index:02d}.txt").write_text(concept_caption(background) + "\n", encoding="utf-8")
    return folder


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
    paint_shape(draw, shape, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), color)
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


def demo_config(data: str | Path = "") -> TrainConfig:
    """What Try the demo trains: the demo preset (quick settings for any tiny model) on the demo model, with its text
    encoder learning too. The trigger word is a word it never saw: learning it there, the cross shows in 250 steps
    (about 20 s on one CPU core), where the UNet alone needs twice as many. Its captions hold that word already;
    naming it as the trigger word tells the page, which asks visitors to keep it in their prompts."""
    return replace(
        load_preset(DEMO_PRESET),
        base_model=str(DEMO_MODEL),
        data=str(data),
        train_text_encoder=True,
        trigger_word=TRIGGER,
    )
