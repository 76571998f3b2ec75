"""DoRA, LoHa and LoKr (TrainConfig.lora_type): trained through peft, resumed exactly, written in diffusers' layout
and in the LyCORIS names other tools load, and applied by Generate as they were trained."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.pipes import fresh_pipe, image, train_and_picture
from helpers.runs import quick_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_gui.demo import write_demo_dataset
from lora_gui.errors import ConfigError
from lora_gui.infer import Generator
from lora_gui.lora_files.detect import detect_layout
from lora_gui.training import train

VARIANTS = ("dora", "loha", "lokr")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in: a 1x1 convolution in the tiny SD 1.5
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]
# The tensors peft trains for each kind, as the diffusers-layout file names them.
PEFT_PARTS = {
    "dora": {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"lokr_w1", "lokr_w2"},  # both factors whole: the tiny layers are narrow against rank 4
}
# What ComfyUI's loader reads of a layer of each kind, beside `<layer>.alpha` (comfy/lora.py, load_lora; the
# adapters in comfy/weight_adapter/: lora.py reads lora_up/lora_down, loha.py hada_w1_a..hada_w2_b, lokr.py
# lokr_w1 or lokr_w1_a/_b and lokr_w2 or lokr_w2_a/_b; base.py's weight_decompose takes dora_scale).
COMFY_PARTS = {
    "dora": {"lora_up.weight", "lora_down.weight", "dora_scale", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "alpha"},
}
# The CLIP layers ComfyUI's key map holds (comfy/lora.py, model_lora_keys_clip and LORA_CLIP_MAP), in kohya's names.
COMFY_CLIP = re.compile(r"lora_te_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])")


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118


def by_layer(tensors: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    layers: dict[str, set[str]] = {}
    for key in tensors:
        layer, _, part = key.partition(".")
        layers.setdefault(layer, set()).add(part)
    return layers


@pytest.fixture(scope="module")
def variants(tiny_models, tmp_path_factory) -> SimpleNamespace:
    """Each kind trained 2 steps on SD 1.5 with its text encoder, with the picture its model made in memory; and the
    same run resumed from its step-1 checkpoint, as after a stop there."""
    root = tmp_path_factory.mktemp("variants")
    photos = write_demo_dataset(root / "photos", count=4, size=(64, 64))
    model = tiny_models("sd15")
    runs = {}
    for lora_type in VARIANTS:
        config = quick_config(
            model,
            photos,
            max_steps=2,
            batch_size=1,
            learning_rate=1e-2,
            sample_steps=1,
            rank=4,
            alpha=2,
            lora_type=lora_type,
            train_text_encoder=True,
            target_modules=UNET_TARGETS,
            text_encoder_target_modules=TEXT_TARGETS,
            checkpoint_every=1,
        )
        trained = train_and_picture(config, root / lora_type)
        resumed = root / f"{lora_type}-resumed"
        shutil.copytree(root / lora_type, resumed)
        shutil.rmtree(resumed / "checkpoints/step-2")
        train(config, resumed, resume=True)
        run = root / lora_type
        runs[lora_type] = SimpleNamespace(
            run=run,
            diffusers=run / "pytorch_lora_weights.safetensors",
            kohya=run / f"{lora_type}.safetensors",
            resumed=resumed / "pytorch_lora_weights.safetensors",
            image=trained,
        )
    return SimpleNamespace(model=model, runs=runs, base=image(fresh_pipe(model)))


@pytest.mark.train
@pytest.mark.parametrize("lora_type", VARIANTS)
def test_each_kind_trains_its_own_peft_adapter_on_the_unet_and_text_encoder(variants, lora_type):
    run = variants.runs[lora_type]
    tensors, _ = read(run.diffusers)
    layers: dict[str, set[str]] = {}
    for key in tensors:
        for part in PEFT_PARTS[lora_type]:
            if key.endswith("." + part):
                layers.setdefault(key[: -len(part) - 1], set()).add(part)
    assert len(layers) * len(PEFT_PARTS[lora_type]) == len(tensors), sorted(tensors)[:5]
    assert all(found == PEFT_PARTS[lora_type] for found in layers.values())
    assert any(layer.startswith("text_encoder.text_model.encoder.layers.0.mlp.fc1") for layer in layers)
    assert any(layer.endswith("proj_in") for layer in layers), "convolutions get the adapter too"
    assert not np.allclose(run.image, variants.base, atol=1e-3), "the adapter learned nothing"


@pytest.mark.train
@pytest.mark.parametrize("lora_type", VARIANTS)
def test_resuming_from_a_checkpoint_gives_the_same_adapter_as_an_uninterrupted_run(variants, lora_type):
    straight, resumed = load_file(variants.runs[lora_type].diffusers), load_file(variants.runs[lora_type].resumed)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.train
@pytest.mark.parametrize("lora_type", VARIANTS)
def test_the_kohya_file_holds_for_each_layer_what_comfyui_reads_for_its_kind(variants, lora_type):
    pipe = fresh_pipe(variants.model)
    # ComfyUI's UNet key map (comfy/lora.py, model_lora_keys_unet): "lora_unet_" + each diffusers module path with "_".
    unet = {"lora_unet_" + name.replace(".", "_"): module for name, module in pipe.unet.named_modules() if name}
    tensors, _ = read(variants.runs[lora_type].kohya)
    layers = by_layer(tensors)
    text = [layer for layer in layers if layer.startswith("lora_te_")]
    assert text and all(COMFY_CLIP.fullmatch(layer) for layer in text), text
    assert set(layers) - set(text) <= set(unet), sorted(set(layers) - set(text) - set(unet))[:5]
    assert all(found == COMFY_PARTS[lora_type] for found in layers.values()), layers
    for layer in layers:
        assert tensors[f"{layer}.alpha"].shape == ()
        if lora_type == "dora" and layer in unet:
            # One length per output row, shaped as LyCORIS' wd_on_output writes it: ComfyUI (base.py,
            # weight_decompose) tells the output axis by dora_scale.shape[0] == the weight's.
            weight = unet[layer].weight
            assert tensors[f"{layer}.dora_scale"].shape == (weight.shape[0], *[1] * (weight.dim() - 1))


@pytest.mark.train
def test_every_adapted_layer_is_in_the_kohya_file(variants):
    for lora_type in VARIANTS:
        kohya, _ = read(variants.runs[lora_type].kohya)
        diffusers_file = load_file(variants.runs[lora_type].diffusers)
        assert len(by_layer(kohya)) * len(PEFT_PARTS[lora_type]) == len(diffusers_file), lora_type


@pytest.mark.train
@pytest.mark.parametrize("lora_type", VARIANTS)
def test_the_metadata_names_the_lycoris_network_as_lycoris_writes_it(variants, lora_type):
    _, metadata = read(variants.runs[lora_type].kohya)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    expected = {
        "dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"},
        "loha": {"algo": "loha"},
        "lokr": {"algo": "lokr", "factor": "-1"},
    }
    assert json.loads(metadata["ss_network_args"]) == expected[lora_type]
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")


@pytest.mark.train
@pytest.mark.parametrize("lora_type", VARIANTS)
def test_generate_makes_the_trained_picture_from_either_file_and_the_base_at_strength_zero(variants, lora_type):
    run = variants.runs[lora_type]
    generator = Generator.load(str(variants.model))
    for path in (run.diffusers, run.kohya):
        assert detect_layout(list(load_file(path))).by_weights
        generator.set_loras([(path, 1.0)])
        np.testing.assert_allclose(image(generator.pipe), run.image, atol=1e-4, err_msg=path.name)
    generator.set_loras([(run.kohya, 0.0)])
    np.testing.assert_array_equal(image(generator.pipe), variants.base)


@pytest.mark.train
def test_diffusers_loads_our_dora_files_unet_as_generate_applies_it(variants, tmp_path):
    """diffusers applies a DoRA's UNet layers (its text encoder loading, through transformers, drops their lengths)."""
    tensors, metadata = read(variants.runs["dora"].diffusers)
    unet_only = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({key: value for key, value in tensors.items() if key.startswith("unet.")}, unet_only, metadata)
    pipe = fresh_pipe(variants.model)
    pipe.load_lora_weights(tmp_path)
    generator = Generator.load(str(variants.model))
    generator.set_loras([(unet_only, 1.0)])
    ours = image(generator.pipe)
    assert np.abs(ours - variants.base).max() > 1e-3
    np.testing.assert_allclose(image(pipe), ours, atol=1e-4)


@pytest.mark.train
def test_generate_applies_lycoris_files_from_other_tools_as_comfyui_does(variants, tmp_path):
    """A LoKr with its second factor low-rank, and a DoRA whose lengths are the input columns' (LyCORIS' default,
    the only kind A1111 reads), in kohya's names: the picture is the base model's with each weight changed as
    ComfyUI computes it (comfy/weight_adapter/lokr.py and base.py's weight_decompose, restated here)."""
    pipe = fresh_pipe(variants.model)
    generator = torch.Generator().manual_seed(0)
    lokr, dora, merged = {}, {}, fresh_pipe(variants.model)
    for name, module in pipe.unet.named_modules():
        if not name.endswith(("attn1.to_q", "attn2.to_k")):
            continue
        layer, weight = "lora_unet_" + name.replace(".", "_"), module.weight.detach()
        out, inner = weight.shape
        if name.endswith("to_q"):  # LoKr: kron(w1, w2_a @ w2_b) * alpha / rank
            w1 = torch.randn(2, 2, generator=generator)
            w2_a, w2_b = torch.randn(out // 2, 2, generator=generator), torch.randn(2, inner // 2, generator=generator)
            lokr.update({f"{layer}.lokr_w1": w1, f"{layer}.lokr_w2_a": w2_a, f"{layer}.lokr_w2_b": w2_b})
            lokr[f"{layer}.alpha"] = torch.tensor(1.0)
            change = torch.kron(w1, w2_a @ w2_b) * (1.0 / 2) * 0.7
        else:  # DoRA on the input axis: (W + up @ down * alpha / rank) * dora_scale / its columns' lengths
            up, down = torch.randn(out, 2, generator=generator) * 0.1, torch.randn(2, inner, generator=generator)
            scale = weight.norm(dim=0, keepdim=True) * (1 + 0.1 * torch.rand(1, inner, generator=generator))
            dora.update({f"{layer}.lora_up.weight": up, f"{layer}.lora_down.weight": down})
            dora.update({f"{layer}.dora_scale": scale, f"{layer}.alpha": torch.tensor(4.0)})
            updated = weight + up @ down * 2.0
            change = (updated * scale / updated.norm(dim=0, keepdim=True) - weight) * 0.5
        merged.unet.get_submodule(name).weight.data += change
    save_file(lokr, tmp_path / "lokr.safetensors")
    save_file(dora, tmp_path / "dora.safetensors")
    assert detect_layout(list(lokr)).name == "LyCORIS LoKr" and detect_layout(list(dora)).name == "DoRA"

    loaded = Generator.load(str(variants.model))
    loaded.set_loras([(tmp_path / "lokr.safetensors", 0.7), (tmp_path / "dora.safetensors", 0.5)])
    expected = image(merged)
    assert np.abs(expected - variants.base).max() > 1e-3
    np.testing.assert_allclose(image(loaded.pipe), expected, atol=1e-4)


@pytest.mark.train
@pytest.mark.parametrize(("family", "lora_type"), [("sdxl", "loha"), ("flux", "lokr")])
def test_other_families_train_a_variant_and_generate_applies_their_kohya_file(tiny_models, tmp_path, family, lora_type):
    """SDXL with both text encoders trained (kohya's lora_te1_/lora_te2_), Flux.1's transformer (diffusers' names)."""
    photos = write_demo_dataset(tmp_path / "photos", count=2, size=(64, 64))
    model = tiny_models(family)
    config = quick_config(
        model,
        photos,
        max_steps=1,
        batch_size=1,
        learning_rate=1e-2,
        sample_steps=1,
        lora_type=lora_type,
        train_text_encoder=family != "flux",
    )
    trained = train_and_picture(config, tmp_path / "run")
    layers = by_layer(load_file(tmp_path / "run/run.safetensors"))
    if family == "sdxl":
        assert {layer.split("_")[1] for layer in layers} == {"unet", "te1", "te2"}
    generator = Generator.load(str(model))
    generator.set_loras([(tmp_path / "run/run.safetensors", 1.0)])
    np.testing.assert_allclose(image(generator.pipe), trained, atol=1e-4)


@pytest.mark.train
def test_loha_and_lokr_on_an_nf4_base_are_refused_in_plain_words(tiny_model, photos):
    with pytest.raises(ConfigError, match="lora_type lokr can't train on a base stored in NF4"):
        quick_config(tiny_model, photos, lora_type="lokr", quantize_base="nf4").validate()
    quick_config(tiny_model, photos, lora_type="dora", quantize_base="nf4").validate()


@pytest.mark.unit
def test_the_estimate_counts_each_kinds_own_parameters():
    from lora_gui.estimate import _meta_unet

    def trained(kind: str) -> int:
        unet, _ = _meta_unet("sd15", "full", 512, (16, kind), ("to_q", "to_k", "to_v", "to_out.0"), torch.bfloat16)
        return sum(param.numel() for param in unet.parameters() if param.requires_grad)

    lora, dora, loha, lokr = map(trained, ("lora", *VARIANTS))
    assert loha == 2 * lora, "LoHa: two low-rank pairs"
    assert lora < dora < 1.05 * lora, "DoRA: a LoRA and one length per output row"
    assert lokr < lora / 4, "LoKr: a small whole factor and a low-rank one"
