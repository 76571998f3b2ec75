"""Settings for a training run of seconds on a CPU: as a TrainConfig, and as `python -m lora_gui train`'s arguments."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from lora_gui.base_models import family_from_files
from lora_gui.config import TrainConfig
from lora_gui.data import picture_files
from lora_gui.families import get_family


def quick_config(base_model: Path, data: Path, **changes) -> TrainConfig:
    """Settings for a run of a few seconds on a CPU; for a model folder (a Path: a name as a string is never looked
    up, as a visitor's model on a Space must not be) that learns from edit pairs alone, on pairs whose "before"
    pictures are the pictures in gray (`gray_before_pictures`)."""
    family = family_from_files(str(base_model)) if isinstance(base_model, Path) else None
    edits = family is not None and not get_family(family).trains_without_pairs and "control_data" not in changes
    values = dict(
        base_model=str(base_model),
        data=str(data),
        control_data=str(gray_before_pictures(data)) if edits else "",
        resolution=64,
        max_steps=12,
        batch_size=2,
        learning_rate=1e-3,
        rank=4,
        sample_every=0,
        sample_steps=2,
        checkpoint_every=0,
        seed=7,
    )
    values.update(changes)
    return TrainConfig(**values)


def train_argv(base_model: Path | str, data: Path | str, output: Path | str, **flags: object) -> list[str]:
    """Arguments of `python -m lora_gui train`, flags as keywords: max_steps=3 -> --max-steps 3,
    aspect_buckets=False -> --no-aspect-buckets, a list -> several values."""
    argv = ["train", "--base-model", str(base_model), "--data", str(data), "--output", str(output)]
    for name, value in flags.items():
        flag = name.replace("_", "-")
        if value is True or value is False:
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{flag}", *map(str, value)]
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def gray_before_pictures(data: Path) -> Path:
    """The "before" pictures of edit pairs whose "after" pictures are those in `data`: each one in gray, under its name,
    in a folder beside it (written once)."""
    folder = data.with_name(f"{data.name}-before")
    if not folder.is_dir():
        for picture in picture_files(data):
            target = folder / picture.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            ImageOps.grayscale(Image.open(picture)).convert("RGB").save(target)
    return folder
