"""Tiny pipelines as the tests use them: loaded fresh through `from_pretrained`, the picture a test compares, training
that keeps the trained model's picture, and how much of a picture is the demo's pink."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from lora_gui.config import TrainConfig
from lora_gui.demo import PINK
from lora_gui.families import detect_family
from lora_gui.training import checkpoints, train


def fresh_pipe(model: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    detect_family(pipe).prepare_pipeline(pipe)  # as base_models.load_pipeline does (Chroma's attention mask)
    return pipe


def image(pipe: DiffusionPipeline, prompt: str = "a photo of a red circle") -> np.ndarray:
    # The flow-matching families (Flux, Z-Image, Flux.2) sample with their own scheduler.
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(3)
    # An editing model's pipeline is told the size as Generate tells it: Kontext's makes 1 MP pictures otherwise.
    family = detect_family(pipe)
    sized = family.reference_options(pipe, [], 64, 64) if family.reference_images else {}
    # The prompt by name: Flux.2's pipelines take an image to edit first.
    picture = pipe(
        prompt=prompt, num_inference_steps=3, height=64, width=64, generator=generator, output_type="np", **sized
    )
    return picture.images[0]


def train_and_picture(config: TrainConfig, run_dir: Path, **train_options) -> np.ndarray:
    """Train into `run_dir`; return `image` of the trained model in memory as the run saves its own LoRA file (not a
    checkpoint's): the picture every file of the run must give back once loaded."""
    seen = {}
    real_save = checkpoints.save_diffusers_lora

    def save_and_look(target, pipe, family):
        if Path(target).parent == Path(run_dir):
            seen["image"] = image(pipe)
        return real_save(target, pipe, family)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "save_diffusers_lora", save_and_look)
        train(config, run_dir, **train_options)
    return seen["image"]


def pink_share(picture: np.ndarray) -> float:
    """The share of a picture's pixels (uint8 RGB) near the pink of the demo's concept, which the demo model alone
    never draws."""
    distance = np.linalg.norm(picture[..., :3].astype(float) - np.array(PINK), axis=-1)
    return float((distance < 90).mean())
