"""Chroma files made elsewhere: lodestones' single-file checkpoints in Black Forest Labs' names, offline; LoRAs in
kohya's sd-scripts' and ai-toolkit's layouts in Generate (diffusers' own loader reads neither on this model)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.flux_files import DOUBLE, DOUBLE_NORMS, SINGLE, SINGLE_NORMS
from helpers.hub import in_download_cache
from helpers.lora_files import lora_from_elsewhere
from helpers.pipes import fresh_pipe, image
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from lora_gui.base_models import checkpoint_family, load_pipeline
from lora_gui.families import REGISTRY
from lora_gui.infer import Generator
from lora_gui.lora_files.detect import detect_layout, made_for_other_model, read_shapes

pytestmark = pytest.mark.train

CHROMA = REGISTRY["chroma"]
RANK, ALPHA = 2, 4.0


def bfl_layers(config) -> dict[str, list[str]]:
    """Black Forest Labs' Chroma layers -> the diffusers layers each holds (written out here from diffusers'
    convert_chroma_transformer_checkpoint_to_diffusers): Flux.1's without the modulation, with the approximator."""
    layers = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"]}
    approximator = "distilled_guidance_layer"
    layers |= {f"{approximator}.{name}": [f"{approximator}.{name}"] for name in ("in_proj", "out_proj")}
    for index in range(config.approximator_layers):
        layers[f"{approximator}.layers.{index}.in_layer"] = [f"{approximator}.layers.{index}.linear_1"]
        layers[f"{approximator}.layers.{index}.out_layer"] = [f"{approximator}.layers.{index}.linear_2"]
    for kind, block, count, table in (
        ("double_blocks", "transformer_blocks", config.num_layers, DOUBLE),
        ("single_blocks", "single_transformer_blocks", config.num_single_layers, SINGLE),
    ):
        for index in range(count):
            layers |= {
                f"{kind}.{index}.{name}": [f"{block}.{index}.{target}" for target in targets]
                for name, targets in table.items()
                if "mod" not in name
            }
    return layers


def bfl_checkpoint(transformer: torch.nn.Module, path: Path) -> Path:
    """A Chroma transformer in lodestones' single-file layout (Chroma1-HD.safetensors): weights and biases, the RMSNorm
    scales as `.scale`."""
    state, config, tensors = transformer.state_dict(), transformer.config, {}
    for original, targets in bfl_layers(config).items():
        for parameter in ("weight", "bias"):
            tensors[f"{original}.{parameter}"] = torch.cat([state[f"{t}.{parameter}"] for t in targets])
    norms = {f"distilled_guidance_layer.norms.{i}": f"distilled_guidance_layer.norms.{i}" for i in range(2)}
    for kind, block, count, table in (
        ("double_blocks", "transformer_blocks", config.num_layers, DOUBLE_NORMS),
        ("single_blocks", "single_transformer_blocks", config.num_single_layers, SINGLE_NORMS),
    ):
        for index in range(count):
            norms |= {f"{kind}.{index}.{name}": f"{block}.{index}.{target}" for name, target in table.items()}
    tensors |= {f"{original}.scale": state[f"{target}.weight"] for original, target in norms.items()}
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def test_a_chroma_checkpoint_loads_offline_with_the_rest_from_the_download_cache(tiny_models, tmp_path, download_cache):
    model = tiny_models("chroma")
    in_download_cache(download_cache, "lodestones/Chroma1-HD", model)
    original = fresh_pipe(model).transformer
    path = bfl_checkpoint(original, tmp_path / "Chroma1-HD.safetensors")
    assert checkpoint_family(path) == "chroma", "not Flux.1, whose double_blocks it has too"
    family, pipe = load_pipeline(str(path))
    assert family is CHROMA
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == original.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in original.state_dict().items())


# ---- LoRAs from elsewhere ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def chroma_lora(tiny_models) -> SimpleNamespace:
    """A random LoRA on every linear layer of the tiny Chroma's transformer (its approximator's too), put on by peft
    outside this app."""
    return lora_from_elsewhere(tiny_models("chroma"), RANK, ALPHA)


def bfl_lora(lora: SimpleNamespace, path: Path, prefix: str, separator: str, kohya: bool) -> Path:
    """The LoRA under Black Forest Labs' names (q, k and v fused: their down weights stacked, their up weights on the
    diagonal), spelled with `separator` after `prefix`; kohya's with lora_down / lora_up and an alpha per layer
    (alpha / rank a fifth, down five times larger: the same LoRA), ai-toolkit's with lora_A / lora_B and none."""
    tensors = {}
    for original, targets in bfl_layers(lora.pipe.transformer.config).items():
        downs, ups = zip(*(lora.layers[target] for target in targets), strict=True)
        down, up = torch.cat(downs), torch.block_diag(*ups)
        module = prefix + original.replace(".", separator)
        if kohya:
            tensors |= {f"{module}.alpha": torch.tensor(down.shape[0] / 5)}
            tensors |= {f"{module}.lora_down.weight": down * 5, f"{module}.lora_up.weight": up}
        else:
            tensors |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


LAYOUTS = {
    # kohya's sd-scripts (flux_train_network.py --model_type chroma): lora_unet_double_blocks_0_img_attn_qkv
    "sd-scripts": lambda lora, path: bfl_lora(lora, path, "lora_unet_", "_", kohya=True),
    # ai-toolkit: Black Forest Labs' dotted names under diffusion_model., no alpha (it trains with alpha = rank)
    "ai-toolkit": lambda lora, path: bfl_lora(lora, path, "diffusion_model.", ".", kohya=False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_chroma_lora_from_elsewhere_loads_in_generate_where_diffusers_alone_does_not(chroma_lora, tmp_path, layout):
    path = LAYOUTS[layout](chroma_lora, tmp_path / f"{layout}.safetensors")
    shapes = read_shapes(path)
    assert detect_layout(list(shapes)).problem == ""
    # diffusers' Flux loader, which ChromaPipeline has: kohya's names through its converter for the full-size Flux.1
    # (19 and 38 blocks of 3072), ai-toolkit's not at all (it warns that no layer matched, and adds none).
    plain = fresh_pipe(chroma_lora.model)
    if layout == "sd-scripts":
        with pytest.raises(AssertionError):
            plain.load_lora_weights(str(path))
    else:
        plain.load_lora_weights(str(path))
        assert not any(isinstance(layer, LoraLayer) for layer in plain.transformer.modules())
    generator = Generator.load(str(chroma_lora.model))
    assert made_for_other_model(shapes, generator.pipe, CHROMA) == ""
    generator.set_loras([(path, 1.0)])
    at_one = image(generator.pipe)
    assert np.abs(at_one - chroma_lora.base).max() > 1e-2, "the LoRA changes the picture"
    np.testing.assert_allclose(at_one, chroma_lora.with_lora, atol=1e-4)
    generator.set_loras([(path, 0.0)])
    np.testing.assert_allclose(image(generator.pipe), chroma_lora.base, atol=1e-6)
