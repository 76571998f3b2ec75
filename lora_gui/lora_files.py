"""LoRA files: writing what the loop trained, and reading it back.

The diffusers layout (`unet.<module>.lora_A.weight`, `text_encoder.text_model.<module>...`) loads
with `pipeline.load_lora_weights`. The adapter's LoraConfig travels in the file's metadata, so
alpha != rank loads at the strength it was trained at.

transformers 5 dropped the `text_model.` level from CLIP's module names, while diffusers and every
other tool expect it: files always carry the canonical names, whatever the installed transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora_gui.errors import LoraFileError
from lora_gui.families import Family
from lora_gui.files import atomic_path

CANONICAL_TEXT_PREFIX = "text_model."


def _needs_text_prefix(module: torch.nn.Module) -> bool:
    """True for a transformers-5 CLIP, whose module names lack the canonical `text_model.` level."""
    return hasattr(module, "config") and not hasattr(module, "text_model") and hasattr(module, "encoder")


def trained_modules(pipe: DiffusionPipeline, family: type[Family]) -> dict[str, torch.nn.Module]:
    """Pipeline component name -> module, for each component that carries a LoRA."""
    names = ("unet", *family.text_encoder_names)
    return {name: getattr(pipe, name) for name in names if getattr(getattr(pipe, name), "peft_config", None)}


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of one module, under canonical module names."""
    state = get_peft_model_state_dict(module)
    if _needs_text_prefix(module):
        state = {CANONICAL_TEXT_PREFIX + key: value for key, value in state.items()}
    return state


def save_diffusers_lora(target: Path, pipe: DiffusionPipeline, family: type[Family]) -> Path:
    """Write the pipeline's LoRA in diffusers' layout, with each adapter's config as metadata."""
    layers, metadata = {}, {}
    for name, module in trained_modules(pipe, family).items():
        layers[f"{name}_lora_layers"] = lora_state_dict(module)
        metadata[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    with atomic_path(target) as tmp:
        family.pipeline_class.save_lora_weights(tmp.parent, weight_name=tmp.name, **layers, **metadata)
    return target


def read_diffusers_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The weights of a file written by `save_diffusers_lora`, and each component's LoraConfig as a dict."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
            packed = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    except (OSError, SafetensorError) as error:
        raise LoraFileError(f"{path} can't be read ({error}); is it a finished LoRA file?") from None
    if packed is None:
        raise LoraFileError(f"{path.name} carries no LoRA settings (rank, alpha), so it can't be converted")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(packed).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return state, configs


def load_trained_lora(source: Path, pipe: DiffusionPipeline, family: type[Family]) -> None:
    """Put weights written by `save_diffusers_lora` back into the training adapters (resume)."""
    saved = load_file(str(source))
    for name, module in trained_modules(pipe, family).items():
        prefix = f"{name}."
        state = {key[len(prefix) :]: value for key, value in saved.items() if key.startswith(prefix)}
        if _needs_text_prefix(module):
            state = {key.removeprefix(CANONICAL_TEXT_PREFIX): value for key, value in state.items()}
        result = set_peft_model_state_dict(module, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint LoRA does not fit the {name}: {unexpected[:3]}")


def lora_config(rank: int, alpha: float, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights="gaussian")
