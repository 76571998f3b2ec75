"""Z-Image files made elsewhere: LoRAs in ai-toolkit's, musubi-tuner's (kohya's names), ComfyUI's (the original
names, q, k and v fused) and diffusers' layouts in Generate; single-file checkpoints in the original names, offline;
and Z-Image Turbo, the distilled model: sampled as it is made to be, trained on through its base."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers.hub import in_download_cache
from helpers.lora_files import lora_from_elsewhere
from helpers.pipes import fresh_pipe, image
from safetensors.torch import save_file

from lora_gui.base_models import load_pipeline
from lora_gui.errors import LoraFileError
from lora_gui.families import REGISTRY, base_for_training
from lora_gui.infer import Generator
from lora_gui.lora_files.detect import detect_layout, read_shapes
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora

pytestmark = pytest.mark.train

ZIMAGE = REGISTRY["zimage"]
RANK, ALPHA = 2, 4.0
# The original (Tongyi-MAI's, ComfyUI's) names of the layers diffusers names otherwise, written out here from
# diffusers' convert_z_image_transformer_checkpoint_to_diffusers, independently of lora_gui: q, k and v are one layer.
ORIGINAL_IN_BLOCK = {
    "attention.qkv": ["attention.to_q", "attention.to_k", "attention.to_v"],
    "attention.out": ["attention.to_out.0"],
}
ORIGINAL_TOP = {
    "x_embedder": "all_x_embedder.2-1",
    "final_layer.linear": "all_final_layer.2-1.linear",
    "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
}
ORIGINAL_NORMS = {"attention.q_norm": "attention.norm_q", "attention.k_norm": "attention.norm_k"}


def original_layers(linear: list[str]) -> dict[str, list[str]]:
    """The original name of each of these linear layers -> the diffusers layers it holds, stacked along its outputs."""
    layers: dict[str, list[str]] = {}
    fused = {target for targets in ORIGINAL_IN_BLOCK.values() for target in targets}
    by_diffusers = {name: original for original, name in ORIGINAL_TOP.items()}
    for name in linear:
        block, _, inner = name.partition(".attention.")
        if inner and f"attention.{inner}" in fused:
            for original, targets in ORIGINAL_IN_BLOCK.items():
                if f"attention.{inner}" in targets:
                    layers[f"{block}.{original}"] = [f"{block}.{target}" for target in targets]
        else:
            layers[by_diffusers.get(name, name)] = [name]
    return layers


@pytest.fixture(scope="module")
def zimage_lora(tiny_models) -> SimpleNamespace:
    """A random LoRA on every linear layer of the tiny Z-Image's transformer, put on by peft outside this app."""
    return lora_from_elsewhere(tiny_models("zimage"), RANK, ALPHA)


def kohya_tensors(module: str, down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer as kohya writes it: scale 1 as alpha / rank, with alpha a fifth of the rank and down five times."""
    return {
        f"{module}.lora_down.weight": down * 5,
        f"{module}.lora_up.weight": up,
        f"{module}.alpha": torch.tensor(down.shape[0] / 5),
    }


def original_names_lora(lora: SimpleNamespace, path: Path, prefix: str, underscored: bool) -> Path:
    """The LoRA under the original names: q, k and v's LoRAs as one on qkv (their down weights stacked, their up
    weights on the diagonal, as musubi-tuner's convert_z_image_lora_to_comfy.py writes them)."""
    tensors = {}
    for original, targets in original_layers(list(lora.layers)).items():
        downs, ups = zip(*(lora.layers[target] for target in targets), strict=True)
        name = original.replace(".", "_") if underscored else original
        tensors |= kohya_tensors(prefix + name, torch.cat(downs), torch.block_diag(*ups))
    save_file(tensors, str(path))
    return path


def diffusers_names_lora(lora: SimpleNamespace, path: Path, prefix: str, style: str) -> Path:
    """The LoRA under diffusers' names after `prefix`: kohya's lora_down / lora_up / alpha, with "." as "_"
    (musubi-tuner), or peft's lora_A / lora_B, with (Flux-style files) or without alphas (ai-toolkit: alpha = rank)."""
    tensors = {}
    for name, (down, up) in lora.layers.items():
        if style == "kohya":
            tensors |= kohya_tensors(prefix + name.replace(".", "_"), down, up)
        else:
            tensors |= {f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up}
            if style == "peft with alpha":
                tensors[f"{prefix}{name}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(tensors, str(path))
    return path


LAYOUTS = {
    "ai-toolkit": lambda lora, path: diffusers_names_lora(lora, path, "diffusion_model.", "peft"),
    "musubi-tuner": lambda lora, path: diffusers_names_lora(lora, path, "lora_unet_", "kohya"),
    "transformer-with-alphas": lambda lora, path: diffusers_names_lora(lora, path, "transformer.", "peft with alpha"),
    "comfyui": lambda lora, path: original_names_lora(lora, path, "diffusion_model.", underscored=False),
    "musubi-to-comfy": lambda lora, path: original_names_lora(lora, path, "lora_unet_", underscored=True),
    "diffusers": lambda lora, path: save_diffusers_lora(path, lora.pipe, ZIMAGE),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_zimage_lora_from_elsewhere_loads_in_generate(zimage_lora, tmp_path, layout):
    path = LAYOUTS[layout](zimage_lora, tmp_path / f"{layout}.safetensors")
    assert detect_layout(list(read_shapes(path))).problem == ""
    generator = Generator.load(str(zimage_lora.model))
    generator.set_loras([(path, 1.0)])
    at_one = image(generator.pipe)
    assert np.abs(at_one - zimage_lora.base).max() > 1e-2, "the LoRA changes the picture"
    np.testing.assert_allclose(at_one, zimage_lora.with_lora, atol=1e-4)
    generator.set_loras([(path, 0.0)])
    np.testing.assert_allclose(image(generator.pipe), zimage_lora.base, atol=1e-6)


def test_a_zimage_lora_for_another_size_says_so(zimage_lora, tmp_path):
    tensors = {
        "diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.zeros(2, 3840),
        "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.zeros(3 * 3840, 2),
    }
    save_file(tensors, str(tmp_path / "full-size.safetensors"))
    generator = Generator.load(str(zimage_lora.model))
    with pytest.raises(LoraFileError, match="made for a model of another size"):
        generator.set_loras([(tmp_path / "full-size.safetensors", 1.0)])


# ---- single-file checkpoints -------------------------------------------------------------------
def original_checkpoint(transformer: torch.nn.Module, path: Path, prefix: str = "", **others: torch.Tensor) -> Path:
    """A Z-Image transformer in the original single-file names (Comfy-Org's z_image_turbo_bf16.safetensors), under
    `prefix` (an all-in-one file's model.diffusion_model.), beside `others`."""
    state, tensors = transformer.state_dict(), dict(others)
    renamed = {diffusers: original for original, diffusers in ORIGINAL_TOP.items()}
    stacked: set[str] = set()
    linear = [name for name, layer in transformer.named_modules() if isinstance(layer, torch.nn.Linear)]
    for original, targets in original_layers(linear).items():
        for parameter in ("weight", "bias"):
            if f"{targets[0]}.{parameter}" in state:
                tensors[f"{prefix}{original}.{parameter}"] = torch.cat([state[f"{t}.{parameter}"] for t in targets])
                stacked |= {f"{t}.{parameter}" for t in targets}
    for key, value in state.items():
        if key not in stacked:
            for original, diffusers in ORIGINAL_NORMS.items():
                key = key.replace(f".{diffusers}.", f".{original}.")
            for diffusers, original in renamed.items():
                key = key.replace(f"{diffusers}.", f"{original}.") if key.startswith(diffusers) else key
            tensors[prefix + key] = value
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["transformer only", "all-in-one"])
def test_a_single_file_zimage_loads_offline_with_the_rest_from_the_download_cache(
    tiny_models, tmp_path, download_cache, layout
):
    model = tiny_models("zimage")
    in_download_cache(download_cache, "Tongyi-MAI/Z-Image-Turbo", model)
    original = fresh_pipe(model)
    if layout == "all-in-one":
        others = {"vae.decoder.conv_in.weight": torch.zeros(1), "text_encoders.qwen3_4b.x": torch.zeros(1)}
        path = original_checkpoint(
            original.transformer, tmp_path / "z_image_aio.safetensors", "model.diffusion_model.", **others
        )
    else:
        path = original_checkpoint(original.transformer, tmp_path / "z_image_turbo_bf16.safetensors")
    family, pipe = load_pipeline(str(path))
    assert family.name == "zimage"
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == original.transformer.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in original.transformer.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(image(pipe), image(original), atol=1e-5)


# ---- Turbo -------------------------------------------------------------------------------------
def test_turbo_samples_in_8_steps_without_guidance_and_a_run_asked_for_it_trains_on_the_base(tiny_models):
    pipe = fresh_pipe(tiny_models("zimage"))  # the base model's schedule: shift 6
    assert ZIMAGE.variant(pipe) == "" and ZIMAGE.generation_defaults(pipe) == (30, 4.0)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)  # Turbo's
    assert ZIMAGE.variant(pipe) == "turbo" and ZIMAGE.generation_defaults(pipe) == (8, 0.0)

    model, why = base_for_training("tongyi-mai/z-image-turbo")  # the Hub ignores case
    assert model == "Tongyi-MAI/Z-Image" and "Tongyi-MAI/Z-Image-Turbo is distilled" in why
    assert base_for_training("Tongyi-MAI/Z-Image") == ("Tongyi-MAI/Z-Image", "")
