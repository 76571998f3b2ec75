"""LoRA files as other tools make them: a tiny model with random peft LoRAs at chosen strengths, and kohya-layout files
written the way kohya names modules (not with lora_gui's converter)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from helpers.pipes import fresh_pipe, image
from lora_gui.infer import Generator

# The layers a LoRA adapts in an SD 1.x UNet and CLIP text encoder.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_pipe(model: Path, alphas: dict[str, float]) -> Generator:
    """A tiny model with one random rank-4 peft LoRA per entry (name -> alpha) on its UNet and text encoder."""
    generator = Generator.load(str(model))
    torch.manual_seed(0)
    for name, alpha in alphas.items():
        for module, targets in ((generator.pipe.unet, UNET_TARGETS), (generator.pipe.text_encoder, TEXT_TARGETS)):
            config = LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: wanted
                inject_adapter_in_model(config, module, adapter_name=name)
    return generator


def set_strengths(generator: Generator, strengths: dict[str, float]) -> None:
    for module in (generator.pipe.unet, generator.pipe.text_encoder):
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                layer.set_adapter(list(strengths))
                for name, strength in strengths.items():
                    layer.set_scale(name, strength)


def kohya_file_by_hand(generator: Generator, adapter: str, path: Path) -> Path:
    """A kohya-layout file of one peft adapter, written the way kohya names modules (not with our converter)."""
    tensors = {}
    for prefix, module in (("lora_unet", generator.pipe.unet), ("lora_te", generator.pipe.text_encoder)):
        for name, layer in module.named_modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                if prefix == "lora_te" and not name.startswith("text_model."):
                    name = "text_model." + name
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = layer.lora_A[adapter].weight.detach().clone()
                tensors[f"{key}.lora_up.weight"] = layer.lora_B[adapter].weight.detach().clone()
                tensors[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]))
    save_file(tensors, str(path))
    return path


def lora_from_elsewhere(model: Path, rank: int, alpha: float) -> SimpleNamespace:
    """A random LoRA put on by peft outside this app, on every linear layer of a tiny transformer model: each layer's
    (down, up) with alpha / rank folded into down, and the pictures without it and with it, for writing the LoRA in
    other tools' layouts and checking Generate reads each back into the same picture."""
    pipe = fresh_pipe(model)
    base = image(pipe)
    torch.manual_seed(0)
    linear = [name for name, layer in pipe.transformer.named_modules() if isinstance(layer, torch.nn.Linear)]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=linear, init_lora_weights=False)
    inject_adapter_in_model(config, pipe.transformer, adapter_name="default")
    pipe.transformer.peft_config = {"default": config}
    layers = {}
    with torch.no_grad():
        for name, layer in pipe.transformer.named_modules():
            if isinstance(layer, LoraLayer):
                layer.lora_B["default"].weight *= 0.2  # a clear change, not a ruined picture
                down, up = layer.lora_A["default"].weight.clone(), layer.lora_B["default"].weight.clone()
                layers[name] = (down * (alpha / rank), up)
    return SimpleNamespace(model=model, pipe=pipe, base=base, with_lora=image(pipe), layers=layers)
