"""The edit demo's LoRA learns the edit its pairs show, not only a colour: after the edit demo's run, pictures made
from before pictures it never saw turn pink where their shape stands, on the left or the right; at strength 0 they
are the base's.

The edit demo's model (`demo.ensure_demo_edit_model`) is the demo model's Flux.1-shaped kin as a Flux.1 Kontext
pipeline: a text-to-image model of the demo's scenes that never learnt to read the before picture's patches, which
follow the noisy ones in its transformer's sequence. The statistic is the side contrast: the pink share (the demo's
pink, helpers.pipes.pink_share) of the picture's half where the before picture's shape is, less that of the other
half, for the pictures with the shape on each side. A LoRA that learnt "pink" alone, or pink in the middle, scores
about 0 on one side or both, as the base does; one that reads the before picture scores above 0 on either side. And
the pictures come nearer the after pictures than the base's: the background follows the before picture too.

Tried once, not kept (it is a second run, over this test's time budget): the same run with each before picture
blanked in training, a LoRA taught the pink without where it goes, scores 0.037 and -0.056 and fails the test.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.pipes import pink_share

from lora_gui.base_models import family_from_files
from lora_gui.demo import (
    DEMO_EDIT_OVERLAY,
    DEMO_MODEL,
    DEMO_RESOLUTION,
    EDIT_CAPTION,
    Scene,
    demo_edit_config,
    demo_edit_family,
    edit_pair,
    ensure_demo_edit_model,
    write_demo_edit_pairs,
)
from lora_gui.infer import Generator, decode
from lora_gui.training import train
from lora_gui.ui.model_choices import TINY_CHOICES, ModelChoices

# Before pictures the pairs do not hold (other seeds, shapes and colours at each place), half with the shape on the
# left, half on the right.
HELD_OUT = [
    (Scene("circle", "red", "gray", "left"), 900),
    (Scene("circle", "yellow", "gray", "right"), 901),
    (Scene("square", "green", "blue", "left"), 902),
    (Scene("triangle", "blue", "gray", "right"), 903),
    (Scene("square", "yellow", "gray", "left"), 904),
    (Scene("circle", "green", "blue", "right"), 905),
    (Scene("triangle", "yellow", "blue", "left"), 906),
    (Scene("square", "red", "gray", "right"), 907),
]
# Measured (these 8 pictures, 10 steps each): the base 0.024 on the left and 0.019 on the right (its pink is a few
# blobs, on gray, where its pictures wander); after the edit demo's run 0.236 and 0.204, each of the 8 from 0.07 to
# 0.39; the same run with training seeds 1, 2 and 3, 0.21/0.11, 0.13/0.09 and 0.23/0.14. The same run with the before
# pictures blanked in training (a LoRA that learns pink, not where): 0.037 and -0.056. Distance to the after pictures:
# base 39 levels, after the runs 23 to 25, blanked 35.
LEARNT = 0.06
NOT_LEARNT = 0.05
CLOSER = 0.8  # the LoRA's pictures are nearer the after pictures than the base's by at least a fifth


def edited(generate: Generator, before, seed: int) -> np.ndarray:
    """The picture the model makes from `before` and the demo's instruction, at 64 px in 10 steps, with the family's
    guidance and its way of giving the pipeline the picture to edit."""
    pipe, family = generate.pipe, generate.family
    _, guidance = family.generation_defaults(pipe)
    size = DEMO_RESOLUTION
    with torch.no_grad():
        latents = pipe(
            prompt=EDIT_CAPTION,
            **family.guidance_options(guidance, ""),
            **family.prompt_options(pipe),
            **family.reference_options(pipe, [before], size, size),
            num_inference_steps=10,
            width=size,
            height=size,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images
    return np.asarray(decode(family, pipe, latents, size, size)[0])


def side_contrast(picture: np.ndarray, position: str) -> float:
    """The pink share of the half where the shape was, less the other half's."""
    half = picture.shape[1] // 2
    left, right = pink_share(picture[:, :half]), pink_share(picture[:, half:])
    return left - right if position == "left" else right - left


def made(generate: Generator) -> list[np.ndarray]:
    return [edited(generate, edit_pair(scene, seed)[0], seed) for scene, seed in HELD_OUT]


def by_side(pictures: list[np.ndarray]) -> dict[str, float]:
    """The mean side contrast of the pictures made from before pictures with the shape on each side."""
    sides: dict[str, list[float]] = {}
    for picture, (scene, _) in zip(pictures, HELD_OUT, strict=True):
        sides.setdefault(scene.position, []).append(side_contrast(picture, scene.position))
    return {side: float(np.mean(values)) for side, values in sides.items()}


def distance_to_after(pictures: list[np.ndarray]) -> float:
    """How far the pictures are from the after pictures, in levels of 255 (mean absolute difference)."""
    afters = [np.asarray(edit_pair(scene, seed)[1]).astype(float) for scene, seed in HELD_OUT]
    return float(np.mean([np.abs(picture - after).mean() for picture, after in zip(pictures, afters, strict=True)]))


@pytest.mark.unit
def test_the_edit_demo_model_is_assembled_as_a_kontext_model_from_the_demo_model(tmp_path: Path):
    model = ensure_demo_edit_model(tmp_path / "model")
    assert family_from_files(str(model)) == "flux-kontext"
    parts = json.loads((model / "model_index.json").read_text(encoding="utf-8"))
    assert {part.name for part in model.iterdir() if part.is_dir()} == {
        name for name, value in parts.items() if isinstance(value, list) and value[0]
    }
    assert (model / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        DEMO_MODEL / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert (model / "vae" / "config.json").read_bytes() == (DEMO_EDIT_OVERLAY / "vae" / "config.json").read_bytes()
    (model / "kept").touch()
    assert ensure_demo_edit_model(model) == model
    assert (model / "kept").is_file(), "an assembled model is used as it is, not assembled again"


@pytest.mark.unit
def test_the_page_s_offline_model_of_the_edit_demo_s_family_is_the_edit_demo_model(tmp_path: Path):
    choices = ModelChoices(tmp_path / "runs", allow_paths=False, on_space=False)
    [choice] = [choice for choice, family in TINY_CHOICES.items() if family == demo_edit_family()]
    model = Path(choices.resolve(choice))
    assert family_from_files(str(model)) == demo_edit_family()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (model / weights).read_bytes() == (DEMO_EDIT_OVERLAY / weights).read_bytes(), "trained, not random"
    assert choices.label(str(model)) == choice


@pytest.mark.train
def test_the_edit_demo_lora_turns_the_shape_pink_where_it_stands_and_strength_zero_is_the_base(tmp_path: Path):
    """The edit demo's run as its preset sets it, without previews and checkpoints."""
    data, control = write_demo_edit_pairs(tmp_path / "after", tmp_path / "before")
    config = demo_edit_config(data, control, tmp_path / "model")
    generate = Generator.load(config.base_model)
    base = made(generate)
    run = tmp_path / "run"
    train(replace(config, sample_every=0, checkpoint_every=0), run)
    generate.set_loras([(run, 1.0)])
    learnt = made(generate)
    assert min(by_side(learnt).values()) > LEARNT, f"{by_side(learnt)} with the LoRA, {by_side(base)} without"
    assert max(by_side(base).values()) < NOT_LEARNT
    assert distance_to_after(learnt) < CLOSER * distance_to_after(base)

    generate.set_loras([(run, 0.0)])
    at_zero = made(generate)
    assert np.abs(np.stack(at_zero).astype(int) - np.stack(base)).max() <= 1  # the same pictures, to a level
