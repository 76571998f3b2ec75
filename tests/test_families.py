"""Base-model families: told apart by the model itself, never by its name; every family trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.runs import gray_before_pictures, train_argv
from PIL import Image
from safetensors.torch import save_file

from lora_gui.base_models import checkpoint_family, family_from_files, load_pipeline
from lora_gui.cli import main
from lora_gui.errors import ModelLoadError
from lora_gui.families import REGISTRY, detect_family


@pytest.mark.train
@pytest.mark.parametrize("family", list(REGISTRY))
def test_family_is_read_from_the_model_not_its_name(tiny_models, tmp_path, family):
    # A misleading folder name must not matter.
    misleading = tmp_path / "sdxl-v1-5-768" / "model"
    misleading.parent.mkdir()
    misleading.symlink_to(tiny_models(family), target_is_directory=True)
    detected, pipe = load_pipeline(str(misleading))
    assert detected.name == family
    assert pipe.vae.dtype == torch.float32


@pytest.mark.train
def test_sd2_tiny_model_is_v_prediction_and_sd15_is_epsilon(tiny_models):
    assert DiffusionPipeline.from_pretrained(tiny_models("sd2")).scheduler.config.prediction_type == "v_prediction"
    assert DiffusionPipeline.from_pretrained(tiny_models("sd15")).scheduler.config.prediction_type == "epsilon"


@pytest.mark.train
def test_family_override(tiny_models):
    pipe = DiffusionPipeline.from_pretrained(tiny_models("sd15"))
    assert detect_family(pipe, "sd2").name == "sd2", "the user may override within the same architecture"
    with pytest.raises(ModelLoadError, match="set to Stable Diffusion XL, but it loads as a StableDiffusionPipeline"):
        detect_family(pipe, "sdxl")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl"),
        ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "sd2"),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "sd15"),
        ("double_blocks.0.img_attn.qkv.weight", "flux"),  # Black Forest Labs' transformer-only file
        ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "flux"),  # an all-in-one file
        ("diffusion_model.double_blocks.0.img_attn.qkv.weight", "flux"),  # ComfyUI's transformer alone
        ("cap_embedder.1.weight", "zimage"),  # Z-Image's original transformer file (Comfy-Org's)
        ("model.diffusion_model.cap_embedder.1.weight", "zimage"),  # in an all-in-one file
        ("distilled_guidance_layer.in_proj.weight", "chroma"),  # lodestones' Chroma1-HD.safetensors, not a Flux.1
        ("model.diffusion_model.distilled_guidance_layer.in_proj.weight", "chroma"),
        ("transformer_blocks.0.img_mod.1.weight", "qwen-image"),  # Comfy-Org's qwen_image_bf16: diffusers' names
        ("model.diffusion_model.transformer_blocks.0.img_mod.1.weight", "qwen-image"),  # in an all-in-one file
        ("something.else", None),
    ],
)
def test_single_file_checkpoint_family_from_its_tensor_names(tmp_path, key, family):
    save_file({key: torch.zeros(1), "model.diffusion_model.out.0.weight": torch.zeros(1)}, tmp_path / "m.safetensors")
    assert checkpoint_family(tmp_path / "m.safetensors") == family


@pytest.mark.train
@pytest.mark.parametrize("family", list(REGISTRY))
def test_family_is_told_from_files_without_loading_or_downloading(tiny_models, tmp_path, monkeypatch, family):
    from huggingface_hub import constants

    misleading = tmp_path / "sdxl-v1-5-768"
    misleading.symlink_to(tiny_models(family), target_is_directory=True)
    assert family_from_files(str(misleading)) == family
    # A Hub model downloaded before is read from the download cache, as huggingface_hub lays it out.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--a-model"
    snapshot = repo / "snapshots" / ("0" * 40)
    (snapshot / "text_encoder").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("model_index.json", "text_encoder/config.json"):
        (snapshot / name).write_bytes((tiny_models(family) / name).read_bytes())
    assert family_from_files("someone/a-model") == family
    assert family_from_files("someone/never-downloaded") is None


@pytest.mark.unit
def test_published_base_models_are_known_by_name_before_any_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert family_from_files("stable-diffusion-v1-5/stable-diffusion-v1-5") == "sd15"
    assert family_from_files("stabilityai/stable-diffusion-2-1") == "sd2"
    assert family_from_files("StabilityAI/Stable-Diffusion-XL-Base-1.0") == "sdxl"  # the Hub ignores case
    assert family_from_files("black-forest-labs/FLUX.1-schnell") == "flux"
    assert family_from_files("Tongyi-MAI/Z-Image-Turbo") == "zimage"
    assert family_from_files("lodestones/Chroma1-Base") == "chroma"
    assert family_from_files("Qwen/Qwen-Image-2512") == "qwen-image"
    assert family_from_files("stabilityai/stable-diffusion-xl-base-1.0-but-not") is None


@pytest.mark.unit
def test_family_of_a_single_file_or_of_nothing_known(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, checkpoint)
    assert family_from_files(str(checkpoint)) == "sdxl"
    (tmp_path / "broken.safetensors").write_text("not a checkpoint")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    for unknown in ("broken.safetensors", "model.ckpt", "no-such-file.safetensors", ""):
        assert family_from_files(str(tmp_path / unknown) if unknown else "") is None


@pytest.mark.train
# SD 1.5: the demo; Chroma: its training, Generate and files are tested elsewhere (test_train's, test_formats' and
# test_chroma_files'), and this CLI path is Flux.1's; Flux.2 dev: klein's loop and CLI, its own previews' parts in
# test_flux2_dev.py; within the suite's time budget.
@pytest.mark.parametrize("family", [name for name in REGISTRY if name not in ("sd15", "chroma", "flux2-dev")])
def test_demo_preset_trains_and_generates_with_every_family(tiny_models, photos, tmp_path, family):
    """An editing model (Flux.1 Kontext, Flux.2) trains on pairs from the command line (`--control-data`), its
    previews a "before" picture beside its edit."""
    model, edits = str(tiny_models(family)), REGISTRY[family].reference_images > 0
    pairs = {"control_data": gray_before_pictures(photos)} if edits else {}
    argv = train_argv(model, photos, tmp_path / "run", preset="tiny-cpu-demo", max_steps=20, sample_every=10, **pairs)
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "run/samples").iterdir()) == ["step-10-0.png", "step-20-0.png"]
    assert Image.open(tmp_path / "run/samples/step-20-0.png").size == ((128 if edits else 64), 64)
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
