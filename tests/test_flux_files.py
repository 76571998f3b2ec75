"""Flux files made elsewhere: LoRAs in kohya's (FluxGym's), ComfyUI's, ai-toolkit's and diffusers' layouts; Black
Forest Labs' single-file checkpoints, offline; and Flux.1-schnell, which has no guidance input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers.flux_files import bfl_checkpoint, bfl_layers, swapped
from helpers.hub import in_download_cache
from helpers.pipes import fresh_pipe, image
from helpers.runs import train_argv
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from lora_gui.base_models import load_pipeline
from lora_gui.cli import main
from lora_gui.errors import LoraFileError, ModelLoadError
from lora_gui.families import REGISTRY
from lora_gui.infer import Generator
from lora_gui.lora_files.detect import detect_layout, made_for_other_model, read_shapes
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora

pytestmark = pytest.mark.train

FLUX = REGISTRY["flux"]
RANK, ALPHA = 2, 4.0
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ---- LoRAs from elsewhere ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_lora(tiny_models) -> SimpleNamespace:
    """A random LoRA put on by peft outside this app, on every linear layer of the tiny Flux's transformer and on
    CLIP's attention and MLP: each layer's (down, up) with alpha / rank folded into down, and the pictures without
    it and with it."""
    model = tiny_models("flux")
    pipe = fresh_pipe(model)
    base = image(pipe)
    torch.manual_seed(0)
    linear = [name for name, layer in pipe.transformer.named_modules() if isinstance(layer, torch.nn.Linear)]
    for component, targets in ((pipe.transformer, linear), (pipe.text_encoder, CLIP_TARGETS)):
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(config, component, adapter_name="default")
        component.peft_config = {"default": config}
    layers = {}
    with torch.no_grad():
        for component in ("transformer", "text_encoder"):
            for name, layer in getattr(pipe, component).named_modules():
                if isinstance(layer, LoraLayer):
                    layer.lora_B["default"].weight *= 0.2  # a clear change, not a ruined picture
                    if component == "text_encoder" and not name.startswith("text_model"):
                        name = f"text_model.{name}"  # CLIP's canonical names, which other tools write
                    down, up = layer.lora_A["default"].weight.clone(), layer.lora_B["default"].weight.clone()
                    layers[f"{component}.{name}"] = (down * (ALPHA / RANK), up)
    with_lora = image(pipe)
    clip_lora = [layer for layer in pipe.text_encoder.modules() if isinstance(layer, LoraLayer)]
    for layer in clip_lora:
        layer.set_scale("default", 0.0)
    transformer_lora = image(pipe)
    for layer in clip_lora:
        layer.set_scale("default", 1.0)
    return SimpleNamespace(
        model=model, pipe=pipe, base=base, with_lora=with_lora, transformer_lora=transformer_lora, layers=layers
    )


def fused(lora: SimpleNamespace, targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA on a layer that holds several: their down weights stacked, their up weights on the diagonal (kohya's
    split_qkv writes them so; the update is the same)."""
    downs, ups = zip(*(lora.layers[f"transformer.{target}"] for target in targets), strict=True)
    return torch.cat(downs), torch.block_diag(*ups)


def bfl_lora(lora: SimpleNamespace, path: Path, name_of: Callable[[str], str], clip_prefix: str = "") -> Path:
    """The LoRA under Black Forest Labs' layer names, as `name_of` spells them, with an alpha per layer; CLIP's
    layers too under `clip_prefix`."""
    tensors = {}
    for original, targets in bfl_layers(lora.pipe.transformer.config).items():
        down, up = fused(lora, targets)
        if original == "final_layer.adaLN_modulation.1":
            up = swapped(up)
        module = name_of(original)
        # Folded scale 1 as alpha / rank: alpha is the rank; a fifth of it, and down five times, mean the same.
        tensors[f"{module}.lora_down.weight"] = down * 5
        tensors[f"{module}.lora_up.weight"] = up
        tensors[f"{module}.alpha"] = torch.tensor(down.shape[0] / 5)
    for name, (down, up) in lora.layers.items():
        if clip_prefix and name.startswith("text_encoder."):
            module = clip_prefix + name.removeprefix("text_encoder.").replace(".", "_")
            tensors |= {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up}
    save_file(tensors, str(path))
    return path


def kohya_lora(lora: SimpleNamespace, path: Path) -> Path:
    """kohya's sd-scripts (networks/lora_flux.py) and FluxGym: lora_unet_double_blocks_0_img_attn_qkv, and CLIP
    as lora_te1_."""
    return bfl_lora(lora, path, lambda name: "lora_unet_" + name.replace(".", "_"), clip_prefix="lora_te1_")


def comfyui_lora(lora: SimpleNamespace, path: Path) -> Path:
    """ComfyUI's own LoRA files: Black Forest Labs' dotted names under diffusion_model."""
    return bfl_lora(lora, path, lambda name: f"diffusion_model.{name}")


def ai_toolkit_lora(lora: SimpleNamespace, path: Path, prefix: str) -> Path:
    """ai-toolkit's: diffusers' names under `prefix`, lora_A and lora_B, no alpha (it trains with alpha = rank)."""
    tensors = {}
    for name, (down, up) in lora.layers.items():
        if name.startswith("transformer."):
            module = prefix + name.removeprefix("transformer.")
            tensors |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


def diffusers_lora(lora: SimpleNamespace, path: Path) -> Path:
    """What this app writes, diffusers' own layout: peft's names and the adapters' configs as metadata."""
    return save_diffusers_lora(path, lora.pipe, FLUX)


# Layout -> (how to write it, whether it carries the CLIP layers too).
LAYOUTS = {
    "kohya": (kohya_lora, True),
    "comfyui": (comfyui_lora, False),
    "ai-toolkit": (lambda lora, path: ai_toolkit_lora(lora, path, "transformer."), False),
    "ai-toolkit-comfy-names": (lambda lora, path: ai_toolkit_lora(lora, path, "diffusion_model."), False),
    "diffusers": (diffusers_lora, True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_flux_lora_from_elsewhere_loads_in_generate(flux_lora, tiny_models, tmp_path, layout):
    write, with_clip = LAYOUTS[layout]
    path = write(flux_lora, tmp_path / f"{layout}.safetensors")
    shapes = read_shapes(path)
    assert detect_layout(list(shapes)).problem == ""
    generator = Generator.load(str(flux_lora.model))
    assert made_for_other_model(shapes, generator.pipe, FLUX) == ""
    sd = Generator.load(str(tiny_models("sd15")))
    assert "Flux" in made_for_other_model(shapes, sd.pipe, sd.family)
    # Every transformer family this trainer knows is named, so a Z-Image or klein LoRA's owner finds theirs.
    named = r"was made for a transformer model \(Flux.1, .*Z-Image.*, or another such as SD3\)"
    with pytest.raises(LoraFileError, match=named):
        sd.set_loras([(path, 1.0)])

    generator.set_loras([(path, 1.0)])
    at_one = image(generator.pipe)
    assert np.abs(at_one - flux_lora.base).max() > 1e-2, "the LoRA changes the picture"
    expected = flux_lora.with_lora if with_clip else flux_lora.transformer_lora
    np.testing.assert_allclose(at_one, expected, atol=1e-4)
    generator.set_loras([(path, 0.0)])
    np.testing.assert_allclose(image(generator.pipe), flux_lora.base, atol=1e-6)


def test_a_stable_diffusion_lora_is_refused_on_flux(tiny_models, tmp_path):
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{module}.lora_down.weight": torch.zeros(4, 32), f"{module}.lora_up.weight": torch.zeros(32, 4)},
        tmp_path / "sd.safetensors",
    )
    generator = Generator.load(str(tiny_models("flux")))
    with pytest.raises(LoraFileError, match=r"made for Stable Diffusion \(it adapts a UNet's layers\)"):
        generator.set_loras([(tmp_path / "sd.safetensors", 1.0)])


def test_a_flux_lora_for_another_size_says_so(flux_lora, tmp_path):
    path = kohya_lora(flux_lora, tmp_path / "fluxgym.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    wide = {
        key: torch.cat([value, value]) if key.endswith("qkv.lora_up.weight") else value
        for key, value in tensors.items()
    }
    save_file(wide, tmp_path / "wide.safetensors")
    generator = Generator.load(str(flux_lora.model))
    with pytest.raises(LoraFileError, match=r"wide.safetensors .*can't be applied to this Flux.1 model: .*qkv has 192"):
        generator.set_loras([(tmp_path / "wide.safetensors", 1.0)])
    deeper = {key.replace("double_blocks_0", "double_blocks_7"): value for key, value in tensors.items()}
    save_file(deeper, tmp_path / "deeper.safetensors")
    with pytest.raises(
        LoraFileError, match=r"double_blocks_7_\w+ adapts transformer_blocks.7.\S+, which this model does not have"
    ):
        generator.set_loras([(tmp_path / "deeper.safetensors", 1.0)])
    t5 = {**tensors, "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 32)}
    save_file(t5, tmp_path / "t5.safetensors")
    with pytest.raises(
        LoraFileError, match=r"it adapts T5 too, which diffusers can't put a LoRA on; it works in ComfyUI"
    ):
        generator.set_loras([(tmp_path / "t5.safetensors", 1.0)])
    assert not generator.pipe.get_list_adapters(), "a failed set leaves no LoRA behind"


def test_a_file_of_no_known_layout_is_refused_in_plain_words(tiny_models, tmp_path, capsys):
    from lora_gui.ui.common import plain_error

    save_file({"something.else": torch.zeros(2)}, tmp_path / "odd.safetensors")
    model = str(tiny_models("flux"))
    with pytest.raises(LoraFileError) as raised:
        Generator.load(model).set_loras([(tmp_path / "odd.safetensors", 1.0)])
    expected = (
        "odd.safetensors is not a LoRA file this app can read: its tensor names (such as something.else) fit none of "
        "the layouts it reads (diffusers', kohya's, FluxGym's, ai-toolkit's, ComfyUI's and LyCORIS')"
    )
    assert plain_error(raised.value) == expected + ".", "as the Generate tab shows it"
    argv = ["generate", "--base-model", model, "--prompt", "a red circle", "--lora", str(tmp_path / "odd.safetensors")]
    assert main([*argv, "--output", str(tmp_path / "out.png")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"Error: {expected}"


# ---- single-file checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["transformer only", "all-in-one"])
def test_a_single_file_flux_loads_offline_with_the_rest_from_the_download_cache(
    tiny_models, tmp_path, download_cache, layout
):
    model = tiny_models("flux")
    in_download_cache(download_cache, "black-forest-labs/FLUX.1-dev", model)
    original = fresh_pipe(model)
    others = {"vae.decoder.conv_in.weight": torch.zeros(1), "text_encoders.clip_l.transformer.x": torch.zeros(1)}
    if layout == "all-in-one":
        path = bfl_checkpoint(
            original.transformer, tmp_path / "flux1-dev-aio.safetensors", "model.diffusion_model.", **others
        )
    else:
        path = bfl_checkpoint(original.transformer, tmp_path / "flux1-dev.safetensors")
    family, pipe = load_pipeline(str(path))
    assert family.name == "flux" and family.variant(pipe) == "dev"
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == original.transformer.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in original.transformer.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(image(pipe), image(original), atol=1e-5)


def schnell_transformer() -> FluxTransformer2DModel:
    """The tiny Flux's transformer as Flux.1-schnell has it: without the guidance input."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(**{**FLUX.denoiser_shapes["tiny"], "guidance_embeds": False})


def test_a_schnell_file_takes_its_shape_from_the_file_whichever_model_gives_the_rest(
    tiny_models, tmp_path, download_cache
):
    in_download_cache(download_cache, "black-forest-labs/FLUX.1-dev", tiny_models("flux"))
    path = bfl_checkpoint(schnell_transformer(), tmp_path / "flux1-schnell.safetensors")
    family, pipe = load_pipeline(str(path))
    assert not pipe.transformer.config.guidance_embeds and family.variant(pipe) == "schnell"
    assert family.generation_defaults(pipe) == (4, 0.0)


def test_a_single_file_flux_offline_with_nothing_downloaded_says_what_to_do(tiny_models, tmp_path, download_cache):
    path = bfl_checkpoint(schnell_transformer(), tmp_path / "flux1-schnell.safetensors")
    with pytest.raises(ModelLoadError) as raised:
        load_pipeline(str(path))
    message = str(raised.value)
    assert message.startswith(
        "flux1-schnell.safetensors is a Flux.1 transformer in one file; the VAE, text encoders and configuration that "
        "go with it come from black-forest-labs/FLUX.1-schnell, which is not in this computer's download cache"
    )
    assert (
        "Connect to the internet once and load black-forest-labs/FLUX.1-schnell (or black-forest-labs/FLUX.1-dev)"
        in message
    )
    assert "from then on this file loads offline too" in message


def test_a_flux_lora_chosen_as_the_base_model_is_refused_plainly(flux_lora, tmp_path, download_cache):
    in_download_cache(download_cache, "black-forest-labs/FLUX.1-dev", flux_lora.model)
    path = comfyui_lora(flux_lora, tmp_path / "comfy.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"comfy.safetensors as a Flux.1 checkpoint: it holds no Flux.1 transformer"
    ):
        load_pipeline(str(path))


# ---- Flux.1-schnell ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_schnell(tiny_models, tmp_path_factory) -> Path:
    """The tiny Flux made schnell: no guidance input, and schnell's schedule (no shift by the picture's size)."""
    folder = tmp_path_factory.mktemp("schnell") / "tiny-schnell"
    shutil.copytree(tiny_models("flux"), folder)
    shutil.rmtree(folder / "transformer")
    schnell_transformer().save_pretrained(folder / "transformer")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "shift": 1.0, "use_dynamic_shifting": False}))
    return folder


def test_a_schnell_lora_trains_is_named_for_schnell_and_generates_with_schnell_steps(tiny_schnell, photos, tmp_path):
    run = tmp_path / "run"
    argv = train_argv(tiny_schnell, photos, run, resolution=64, max_steps=4, batch_size=2, sample_every=4)
    assert main([*argv, "--sample-steps", "2"]) == 0
    assert [p.name for p in (run / "samples").iterdir()] == ["step-4-0.png"]
    with safe_open(str(run / "run.safetensors"), framework="pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"

    generator = Generator.load(str(tiny_schnell))
    generator.set_loras([(run, 1.0)])
    calls = []
    generator.pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    generator("a red circle", width=64, height=64)
    assert len(calls) == 4, "schnell makes its pictures in 4 steps"
    out = tmp_path / "out.png"
    common = ["--prompt", "a red circle", "--width", "64", "--height", "64", "--output", str(out)]
    assert main(["generate", "--base-model", str(tiny_schnell), "--lora", str(run), *common]) == 0
