"""LoRA files in diffusers' layout: writing what the loop trained, and reading it back.

The diffusers layout (`unet.<module>.lora_A.weight`, `text_encoder.text_model.<module>...`) loads
with `pipeline.load_lora_weights`. The adapter's peft config travels in the file's metadata, so
alpha != rank loads at the strength it was trained at. The other kinds keep peft's names the same way: DoRA adds
`<module>.lora_magnitude_vector`, LoHa is `<module>.hada_w1_a` ... `hada_w2_b`, LoKr `<module>.lokr_w1`, `lokr_w2`
(or their `_a`/`_b` factors). diffusers loads plain LoRA and a DoRA's UNet (for a text encoder it drops DoRA's
magnitudes); LoHa and LoKr files are read back by resume and by Generate (infer.py) alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from safetensors import SafetensorError, safe_open

from lora_gui.adapters import lora_state_dict, trained_modules
from lora_gui.atomic import atomic_path
from lora_gui.errors import LoraFileError
from lora_gui.families import Family


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
