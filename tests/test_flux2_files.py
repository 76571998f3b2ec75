"""Flux.2 klein files made elsewhere: Black Forest Labs' single-file checkpoints, offline; LoRAs in musubi-tuner's and
kohya's, ai-toolkit's, ComfyUI's and diffusers' layouts in Generate; and the distilled models' few-step sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.flux_files import DOUBLE_NORMS, SINGLE_NORMS, swapped  # Black Forest Labs' names, as Flux.1's
from helpers.hub import in_download_cache
from helpers.lora_files import lora_from_elsewhere
from helpers.pipes import fresh_pipe, image
from safetensors.torch import save_file

from lora_gui.base_models import checkpoint_family, load_pipeline
from lora_gui.families import REGISTRY, family_of_lora
from lora_gui.infer import Generator
from lora_gui.lora_files.detect import detect_layout, made_for_other_model, read_shapes
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora

pytestmark = pytest.mark.train

KLEIN, DEV = REGISTRY["flux2-klein"], REGISTRY["flux2-dev"]
RANK, ALPHA = 2, 4.0

# Black Forest Labs' layers -> the diffusers layers each holds, stacked along its outputs; written out here from
# diffusers' convert_flux2_transformer_checkpoint_to_diffusers (loaders/single_file_utils.py), apart from lora_gui.
TOP = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_guidance_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_guidance_embed.timestep_embedder.linear_2"],
    "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
    "double_stream_modulation_txt.lin": ["double_stream_modulation_txt.linear"],
    "single_stream_modulation.lin": ["single_stream_modulation.linear"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # (shift, scale) where diffusers has (scale, shift)
}
DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.linear_in"],
    "img_mlp.2": ["ff.linear_out"],
    "txt_mlp.0": ["ff_context.linear_in"],
    "txt_mlp.2": ["ff_context.linear_out"],
}
SINGLE = {"linear1": ["attn.to_qkv_mlp_proj"], "linear2": ["attn.to_out"]}
# dev's guidance input, which klein has not.
GUIDANCE = {
    "guidance_in.in_layer": ["time_guidance_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_guidance_embed.guidance_embedder.linear_2"],
}


def bfl_layers(config) -> dict[str, list[str]]:
    layers = {name: list(targets) for name, targets in (TOP | (GUIDANCE if config.guidance_embeds else {})).items()}
    for kind, block, count, table in (
        ("double_blocks", "transformer_blocks", config.num_layers, DOUBLE),
        ("single_blocks", "single_transformer_blocks", config.num_single_layers, SINGLE),
    ):
        for index in range(count):
            layers |= {f"{kind}.{index}.{n}": [f"{block}.{index}.{t}" for t in ts] for n, ts in table.items()}
    return layers


def bfl_checkpoint(transformer: torch.nn.Module, path: Path) -> Path:
    """A klein transformer in Black Forest Labs' single-file layout (flux-2-klein-base-4b.safetensors): weights only,
    no biases, the attention's RMSNorm scales as `.scale`."""
    state, config, tensors = transformer.state_dict(), transformer.config, {}
    for original, targets in bfl_layers(config).items():
        value = torch.cat([state[f"{target}.weight"] for target in targets])
        tensors[f"{original}.weight"] = swapped(value) if original.startswith("final_layer.ada") else value
    for kind, block, count, norms in (
        ("double_blocks", "transformer_blocks", config.num_layers, DOUBLE_NORMS),
        ("single_blocks", "single_transformer_blocks", config.num_single_layers, SINGLE_NORMS),
    ):
        for index in range(count):
            for original, target in norms.items():
                tensors[f"{kind}.{index}.{original}.scale"] = state[f"{block}.{index}.{target}.weight"]
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


# ---- single-file checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "repo", "file"),
    [
        ("flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B", "flux-2-klein-base-4b.safetensors"),
        ("flux2-dev", "black-forest-labs/FLUX.2-dev", "flux2-dev.safetensors"),
    ],
)
def test_a_bfl_checkpoint_loads_offline_with_the_rest_from_the_download_cache(
    tiny_models, tmp_path, download_cache, family, repo, file
):
    model = tiny_models(family)
    in_download_cache(download_cache, repo, model)
    original = fresh_pipe(model)
    path = bfl_checkpoint(original.transformer, tmp_path / file)
    # Not Flux.1, whose double_blocks (and dev's guidance_in) it has too; klein's and dev's differ by guidance_in.
    assert checkpoint_family(path) == family
    loaded_family, pipe = load_pipeline(str(path))
    assert loaded_family is REGISTRY[family]
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == original.transformer.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in original.transformer.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(image(pipe), image(original), atol=1e-5)


# ---- LoRAs from elsewhere ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def klein_lora(tiny_models) -> SimpleNamespace:
    """A random LoRA on every linear layer of the tiny klein's transformer (the shared modulation and the final
    layer's too), put on by peft outside this app."""
    return lora_from_elsewhere(tiny_models("flux2-klein"), RANK, ALPHA)


def bfl_lora(lora: SimpleNamespace, path: Path, prefix: str, separator: str, suffixes: tuple[str, str]) -> Path:
    """The LoRA under Black Forest Labs' layer names (q, k and v fused: their down weights stacked, their up weights
    on the diagonal), spelled with `separator` after `prefix`, with an alpha per layer where the suffixes are
    kohya's (alpha / rank: a fifth, with down five times larger, means the same)."""
    tensors = {}
    down_suffix, up_suffix = suffixes
    for original, targets in bfl_layers(lora.pipe.transformer.config).items():
        downs, ups = zip(*(lora.layers[target] for target in targets), strict=True)
        down, up = torch.cat(downs), torch.block_diag(*ups)
        up = swapped(up) if original.startswith("final_layer.ada") else up
        module = prefix + original.replace(".", separator)
        if down_suffix == "lora_down.weight":
            tensors |= {f"{module}.alpha": torch.tensor(down.shape[0] / 5)}
            down = down * 5
        tensors |= {f"{module}.{down_suffix}": down, f"{module}.{up_suffix}": up}
    save_file(tensors, str(path))
    return path


def diffusers_names_with_alpha(lora: SimpleNamespace, path: Path) -> Path:
    """ComfyUI's and SimpleTuner's: diffusers' names under transformer., lora_A and lora_B and an alpha."""
    tensors = {}
    for name, (down, up) in lora.layers.items():
        module = f"transformer.{name}"
        tensors |= {f"{module}.lora_A.weight": down * 2, f"{module}.lora_B.weight": up}
        tensors[f"{module}.alpha"] = torch.tensor(down.shape[0] / 2)
    save_file(tensors, str(path))
    return path


KOHYA = ("lora_down.weight", "lora_up.weight")
PEFT = ("lora_A.weight", "lora_B.weight")
LAYOUTS = {
    # musubi-tuner and kohya's sd-scripts: lora_unet_double_blocks_0_img_attn_qkv
    "musubi-tuner": lambda lora, path: bfl_lora(lora, path, "lora_unet_", "_", KOHYA),
    # ai-toolkit: Black Forest Labs' dotted names under diffusion_model., no alpha (it trains with alpha = rank)
    "ai-toolkit": lambda lora, path: bfl_lora(lora, path, "diffusion_model.", ".", PEFT),
    # ComfyUI's own files: the same names with kohya's suffixes and alphas
    "comfyui": lambda lora, path: bfl_lora(lora, path, "diffusion_model.", ".", KOHYA),
    "diffusers-names-with-alpha": diffusers_names_with_alpha,
    "diffusers": lambda lora, path: save_diffusers_lora(path, lora.pipe, KLEIN),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_klein_lora_from_elsewhere_loads_in_generate(klein_lora, tiny_models, tmp_path, layout):
    path = LAYOUTS[layout](klein_lora, tmp_path / f"{layout}.safetensors")
    shapes = read_shapes(path)
    assert detect_layout(list(shapes)).problem == ""
    generator = Generator.load(str(klein_lora.model))
    assert made_for_other_model(shapes, generator.pipe, KLEIN) == ""
    generator.set_loras([(path, 1.0)])
    at_one = image(generator.pipe)
    assert np.abs(at_one - klein_lora.base).max() > 1e-2, "the LoRA changes the picture"
    np.testing.assert_allclose(at_one, klein_lora.with_lora, atol=1e-4)
    generator.set_loras([(path, 0.0)])
    np.testing.assert_allclose(image(generator.pipe), klein_lora.base, atol=1e-6)


def test_dev_loras_from_other_tools_load_in_generate_guidance_input_included(tiny_models, tmp_path):
    """musubi-tuner's and ai-toolkit's layouts (Black Forest Labs' names, guidance_in too) in Generate on dev; and a
    LoRA of dev's 48 single blocks is told from klein's by them."""
    lora = lora_from_elsewhere(tiny_models("flux2-dev"), RANK, ALPHA)
    assert any(name.startswith("time_guidance_embed.guidance_embedder.") for name in lora.layers)
    generator = Generator.load(str(lora.model))
    for layout in ("musubi-tuner", "ai-toolkit"):
        path = LAYOUTS[layout](lora, tmp_path / f"{layout}.safetensors")
        assert made_for_other_model(read_shapes(path), generator.pipe, DEV) == ""
        generator.set_loras([(path, 1.0)])
        np.testing.assert_allclose(image(generator.pipe), lora.with_lora, atol=1e-4)
    assert np.abs(lora.with_lora - lora.base).max() > 1e-2, "the LoRA changes the picture"
    assert family_of_lora(["lora_unet_single_blocks_47_linear2.lora_up.weight"]) is DEV
    klein_9b = ["lora_unet_single_blocks_23_linear2.lora_up.weight", "lora_unet_single_stream_modulation_lin.alpha"]
    assert family_of_lora(klein_9b) is KLEIN


def test_a_klein_lora_for_another_size_says_so(klein_lora, tmp_path):
    from lora_gui.errors import LoraFileError

    path = LAYOUTS["musubi-tuner"](klein_lora, tmp_path / "musubi.safetensors")
    tensors = read_tensors(path)
    wide = {key: torch.cat([v, v]) if key.endswith("qkv.lora_up.weight") else v for key, v in tensors.items()}
    save_file(wide, tmp_path / "wide.safetensors")
    generator = Generator.load(str(klein_lora.model))
    with pytest.raises(LoraFileError, match=r"wide.safetensors .*made for a model of another size"):
        generator.set_loras([(tmp_path / "wide.safetensors", 1.0)])
    assert not generator.pipe.get_list_adapters(), "a failed set leaves no LoRA behind"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- distilled models --------------------------------------------------------------------------
def test_a_distilled_klein_generates_in_four_steps_without_guidance(tiny_models, tmp_path):
    """A distilled model (is_distilled in its model_index.json) makes its pictures in 4 steps, one transformer call
    each; the base in 50, two calls each (guided against the empty prompt)."""
    distilled = tmp_path / "tiny-klein-distilled"
    shutil.copytree(tiny_models("flux2-klein"), distilled)
    index = distilled / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "is_distilled": True}))
    for model, steps, calls in ((distilled, 4, 4), (tiny_models("flux2-klein"), 50, 100)):
        generator = Generator.load(str(model))
        assert generator.family.generation_defaults(generator.pipe) == (steps, 1.0 if steps == 4 else 4.0)
        seen: list[int] = []
        generator.pipe.transformer.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        generator("a red circle", width=32, height=32)
        assert len(seen) == calls
