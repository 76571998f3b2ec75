"""Base-model families: told apart by the model itself, never by its name; every family trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_argv
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from lora_gui.__main__ import main
from lora_gui.errors import ModelLoadError
from lora_gui.families import detect_family
from lora_gui.models import checkpoint_family, load_pipeline


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_family_is_read_from_the_model_not_its_name(tiny_models, tmp_path, family):
    # A misleading folder name must not matter.
    misleading = tmp_path / "sdxl-v1-5-768" / "model"
    misleading.parent.mkdir()
    misleading.symlink_to(tiny_models(family), target_is_directory=True)
    detected, pipe = load_pipeline(str(misleading))
    assert detected.name == family
    assert pipe.vae.dtype == torch.float32


def test_sd2_tiny_model_is_v_prediction_and_sd15_is_epsilon(tiny_models):
    assert DiffusionPipeline.from_pretrained(tiny_models("sd2")).scheduler.config.prediction_type == "v_prediction"
    assert DiffusionPipeline.from_pretrained(tiny_models("sd15")).scheduler.config.prediction_type == "epsilon"


def test_family_override(tiny_models):
    pipe = DiffusionPipeline.from_pretrained(tiny_models("sd15"))
    assert detect_family(pipe, "sd2").name == "sd2", "the user may override within the same architecture"
    with pytest.raises(ModelLoadError, match="set to Stable Diffusion XL, but it loads as a StableDiffusionPipeline"):
        detect_family(pipe, "sdxl")


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl"),
        ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "sd2"),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "sd15"),
        ("something.else", None),
    ],
)
def test_single_file_checkpoint_family_from_its_tensor_names(tmp_path, key, family):
    save_file({key: torch.zeros(1), "model.diffusion_model.out.0.weight": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert checkpoint_family(tmp_path / "m.safetensors") == family


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_demo_preset_trains_and_generates_with_every_family(tiny_models, photos, tmp_path, family):
    model = str(tiny_models(family))
    argv = train_argv(model, photos, tmp_path / "run", preset="tiny-cpu-demo", max_steps=20, sample_every=10)
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "run/samples").iterdir()) == ["step-10-0.png", "step-20-0.png"]
    args = [
        "generate",
        "--base-model",
        model,
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
    ]
    assert main([*args, "--output", str(tmp_path / "base.png")]) == 0
    assert main([*args, "--lora", str(tmp_path / "run"), "--output", str(tmp_path / "lora.png")]) == 0
    base, lora = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("base", "lora"))
    assert np.abs(base - lora).max() > 3
