"""Qwen-Image files made elsewhere: LoRAs in musubi-tuner's, ai-toolkit's, ComfyUI's, SimpleTuner's and diffusers'
layouts in Generate; single-file checkpoints (Comfy-Org's qwen_image_bf16.safetensors, alone or in an all-in-one file),
offline, with the rest of the model from the download cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.hub import in_download_cache
from helpers.lora_files import lora_from_elsewhere
from helpers.pipes import fresh_pipe, image
from safetensors.torch import save_file

from lora_gui.base_models import load_pipeline
from lora_gui.infer import Generator
from lora_gui.lora_files.detect import detect_layout, read_shapes
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora

pytestmark = pytest.mark.train

RANK, ALPHA = 2, 4.0


def written(lora: SimpleNamespace, path: Path, prefix: str, style: str) -> Path:
    """The LoRA under diffusers' layer names after `prefix`: kohya's lora_down / lora_up / alpha, "." as "_" in the
    names (musubi-tuner's), or as ComfyUI saves one (dots kept); or peft's lora_A / lora_B without alphas (ai-toolkit:
    alpha = rank) or with them (SimpleTuner's and ComfyUI's diffusers-named files). Every alpha is a fifth of the rank,
    the down weight five times larger: a reader that drops alpha / rank gets another picture."""
    tensors = {}
    for name, (down, up) in lora.layers.items():
        alpha = torch.tensor(down.shape[0] / 5)
        if style in ("kohya", "comfyui"):
            module = prefix + (name.replace(".", "_") if style == "kohya" else name)
            tensors |= {
                f"{module}.lora_down.weight": down * 5,
                f"{module}.lora_up.weight": up,
                f"{module}.alpha": alpha,
            }
        elif style == "peft with alpha":
            tensors |= {f"{prefix}{name}.lora_A.weight": down * 5, f"{prefix}{name}.lora_B.weight": up}
            tensors[f"{prefix}{name}.alpha"] = alpha
        else:
            tensors |= {f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


LAYOUTS = {
    "musubi-tuner": lambda lora, path: written(lora, path, "lora_unet_", "kohya"),
    "ai-toolkit": lambda lora, path: written(lora, path, "diffusion_model.", "peft"),
    "comfyui": lambda lora, path: written(lora, path, "diffusion_model.", "comfyui"),
    "transformer-with-alphas": lambda lora, path: written(lora, path, "transformer.", "peft with alpha"),
}


def test_a_qwen_image_lora_from_elsewhere_gives_its_picture_in_generate(tiny_models, tmp_path):
    """Each layout, on every linear layer of the transformer (the modulation and embedders too), at strength 1 gives
    the picture peft's LoRA gives; at 0 (once: one code path for all) the base's."""
    lora = lora_from_elsewhere(tiny_models("qwen-image"), RANK, ALPHA)
    generator = Generator.load(str(lora.model))
    files = {layout: write(lora, tmp_path / f"{layout}.safetensors") for layout, write in LAYOUTS.items()}
    files["diffusers"] = save_diffusers_lora(tmp_path / "diffusers.safetensors", lora.pipe, generator.family)
    assert np.abs(lora.with_lora - lora.base).max() > 1e-2, "the LoRA changes the picture"
    for layout, path in files.items():
        assert detect_layout(list(read_shapes(path))).problem == "", layout
        generator.set_loras([(path, 1.0)])
        np.testing.assert_allclose(image(generator.pipe), lora.with_lora, atol=1e-4, err_msg=layout)
    generator.set_loras([(path, 0.0)])
    np.testing.assert_allclose(image(generator.pipe), lora.base, atol=1e-6)


def test_a_single_file_qwen_image_loads_offline_with_the_rest_from_the_download_cache(
    tiny_models, tmp_path, download_cache
):
    """Comfy-Org's file holds the transformer in diffusers' names; an all-in-one file under model.diffusion_model.,
    beside its VAE and text encoder. Either loads with its own depth, the rest from Qwen/Qwen-Image in the cache."""
    model = tiny_models("qwen-image")
    in_download_cache(download_cache, "Qwen/Qwen-Image", model)
    original = fresh_pipe(model)
    state = original.transformer.state_dict()
    alone = tmp_path / "qwen_image_bf16.safetensors"
    save_file(state, str(alone))
    everything = tmp_path / "qwen_image_aio.safetensors"
    others = {"vae.decoder.conv_in.weight": torch.zeros(1), "text_encoders.qwen25_7b.x": torch.zeros(1)}
    save_file({**{f"model.diffusion_model.{key}": value for key, value in state.items()}, **others}, str(everything))
    for path in (alone, everything):
        family, pipe = load_pipeline(str(path))
        assert family.name == "qwen-image", path.name
        loaded = pipe.transformer.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[key], state[key]) for key in state)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(image(pipe), image(original), atol=1e-5)


def test_generate_guides_with_true_cfg_against_a_blank_negative_prompt_by_default(tiny_models, monkeypatch):
    """Generate's guidance reaches the pipeline as true_cfg_scale (its guidance_scale is for guidance-distilled models
    and is ignored), against " " where no negative prompt is given, as the model card makes pictures; the one frame
    its VAE decodes comes out as a picture."""
    generator = Generator.load(str(tiny_models("qwen-image")))
    assert generator.family.generation_defaults(generator.pipe) == (50, 4.0)
    pipeline_class, calls = type(generator.pipe), []
    real_call = pipeline_class.__call__

    def spy(pipe, **kwargs):
        calls.append(kwargs)
        return real_call(pipe, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", spy)
    picture = generator("a red circle", steps=2, width=64, height=64)
    generator("a red circle", negative_prompt="blurry", guidance=2.5, steps=2, width=64, height=64)
    assert picture.size == (64, 64)
    assert [(call["true_cfg_scale"], call["negative_prompt"]) for call in calls] == [(4.0, " "), (2.5, "blurry")]
    assert all("guidance_scale" not in call and call["max_sequence_length"] == 48 for call in calls)
