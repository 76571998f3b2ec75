"""Pictures drawn with captions, so the demo and the tests need no download and no photos.

Two kinds. The demo model's world: one coloured shape on a plain background, at a named place
(`draw_scene`; `scripts/demo_base/` trains the demo model, shipped in `demo_model/`, on such scenes), and the
concept the demo teaches it, a shape it never saw called by a trigger word (`write_demo_concept`). The edit demo's
before/after pairs, a shape turned pink where it stands (`write_demo_edit_pairs`), for an editing model of the same
world (`ensure_demo_edit_model`). And coloured
shapes on a softly striped background with "a photo of a red circle" captions (`write_demo_dataset`), for the
tests, benchmarks and load tests, whatever the model.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from lora_gui.atomic import atomic_folder
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
    return _family_of(DEMO_MODEL)


@functools.cache
def demo_edit_family() -> str:
    """The edit demo model's family, told from its files as `demo_family` is: the overlay's model_index.json and the
    demo model's text encoder, which it keeps."""
    return _family_of(DEMO_EDIT_OVERLAY)


def _family_of(folder: Path) -> str:
    index = json.loads((folder / "model_index.json").read_text())
    text_encoder = json.loads((DEMO_MODEL / "text_encoder" / "config.json").read_text())
    family = family_of_configs(index, text_encoder)
    if family is None:
        raise ModelLoadError(f"the demo model in {folder} is of no family this trainer knows")
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


# The edit demo's model: Flux.1 Kontext's classes on the demo model's VAE and CLIP. There is no pretrained editing
# model this small: it is the Flux.1-shaped kin of the demo model (scripts/demo_base/train_flux.py, a text-to-image
# model of the same scenes) as a FluxKontextPipeline, which reads the before picture's patches after the noisy ones.
# Reading them is what the edit LoRA learns. demo_edit_model/ holds only what differs from demo_model/ (1.4 MB);
# `ensure_demo_edit_model` lays it over a copy of it.
DEMO_EDIT_OVERLAY = Path(__file__).resolve().parent / "demo_edit_model"
DEMO_EDIT_PRESET = "tiny-cpu-edit-demo"
EDIT_CAPTION = f"{TRIGGER}: make the shape pink"
# The edit: the shape turned the demo's pink where it stands. On gray and blue, where the demo model's VAE keeps pink
# truest, and on the left or right, so a picture made from a before picture tells whether the LoRA read it.
EDIT_BACKGROUNDS = ("gray", "blue")
EDIT_COLORS = ("red", "green", "yellow", "blue")
EDIT_POSITIONS = ("left", "right")
EDIT_SIDES = (0.4, 0.5)  # larger than the demo model's scenes: the shape spans more of the model's 4x4 patches


def default_demo_edit_folder() -> Path:
    """Where the edit demo's model is assembled when no folder is named: this user's cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lora_gui" / "demo-edit-model"


def ensure_demo_edit_model(folder: str | Path | None = None) -> Path:
    """The edit demo's model in `folder`, assembled the first time from the demo model and the edit overlay: the parts
    its model_index.json names, copied from the demo model, with the overlay's files laid over them. Written beside
    the folder and renamed into place, so a half-assembled model is never used (ensure_tiny_model's way)."""
    folder = Path(folder) if folder is not None else default_demo_edit_folder()
    if (folder / "model_index.json").is_file():
        return folder
    parts = json.loads((DEMO_EDIT_OVERLAY / "model_index.json").read_text(encoding="utf-8"))
    try:
        with atomic_folder(folder, replace=False) as tmp:
            for part in DEMO_MODEL.iterdir():
                if part.is_dir() and part.name in parts:
                    shutil.copytree(part, tmp / part.name)
            shutil.copytree(DEMO_EDIT_OVERLAY, tmp, dirs_exist_ok=True)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
    return folder


def edit_pair(scene: Scene, seed: int, size: int = DEMO_RESOLUTION) -> tuple[Image.Image, Image.Image]:
    """A before picture of `scene` and its after picture: the same shape, at the same place and size, in pink."""
    before = draw_scene(scene, size, random.Random(seed), sides=EDIT_SIDES)
    after = draw_scene(replace(scene, color=CROSS_COLOR), size, random.Random(seed), sides=EDIT_SIDES)
    return before, after


def edit_scenes(count: int, seed: int = 1) -> list[Scene]:
    """`count` scenes for the edit: the backgrounds, colours and sides in turn (no shape in its background's
    colour), the shape chosen at random."""
    rng, scenes = random.Random(seed), []
    combos = [(background, color) for color in EDIT_COLORS for background in EDIT_BACKGROUNDS if color != background]
    for index in range(count):
        background, color = combos[index % len(combos)]
        position = EDIT_POSITIONS[index % len(EDIT_POSITIONS)]
        scenes.append(Scene(rng.choice(SHAPES), color, background, position))
    return scenes


def write_demo_edit_pairs(data: str | Path, control: str | Path, count: int = 16, size: int = 128) -> tuple[Path, Path]:
    """`count` edit pairs: after pictures in `data` with the instruction as their captions ("zqx: make the shape
    pink"), and their before pictures, under the same names, in `control`."""
    data, control = Path(data), Path(control)
    data.mkdir(parents=True, exist_ok=True)
    control.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(edit_scenes(count)):
        before, after = edit_pair(scene, 100 + index, size)
        name = f"{TRIGGER}_edit_{index:02d}"
        before.save(control / f"{name}.png")
        after.save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(EDIT_CAPTION + "\n", encoding="utf-8")
    return data, control


def demo_edit_config(data: str | Path = "", control: str | Path = "", model: str | Path | None = None) -> TrainConfig:
    """What the edit demo trains: its preset on the edit demo's model (assembled in `model`, or this user's cache),
    on the pairs in `data` and `control`. The text encoders stay frozen, as the app trains Flux; the trigger word
    starts the instruction."""
    return replace(
        load_preset(DEMO_EDIT_PRESET),
        base_model=str(ensure_demo_edit_model(model)),
        data=str(data),
        control_data=str(control),
        train_text_encoder=False,
        trigger_word=TRIGGER,
    )
