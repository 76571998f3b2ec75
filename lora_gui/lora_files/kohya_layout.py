"""The kohya layout of a LoRA: what AUTOMATIC1111, Forge and ComfyUI load.

Each adapted module becomes `<prefix>_<module path with "." as "_">` with three tensors:
`.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and a scalar `.alpha`. The tools
scale the update by alpha / rank (rank = lora_down's first dimension), so alpha is written as
the scale actually trained times the rank: the file means the same at strength 1.0 everywhere.

Prefixes follow kohya's sd-scripts (networks/lora.py): `lora_unet` for the UNet, and one per
text encoder (`lora_te` for SD 1/2, `lora_te1`/`lora_te2` for SDXL) before the canonical CLIP
names, which start with `text_model.`. The UNet keeps diffusers' module paths: kohya writes those
for SD 1/2, and ComfyUI (comfy/lora.py, model_lora_keys_unet) and A1111 (networks.py,
convert_diffusers_name_to_compvis) map them for every Stable Diffusion UNet.

A family whose `kohya_module_names` is off (Flux.1) keeps diffusers' names whole
(`transformer.<module>.lora_A.weight`, `.lora_B.weight`) beside the same `.alpha`: ComfyUI maps
`transformer.<diffusers name>` onto Flux's own fused layers (comfy/lora.py, model_lora_keys_unet, through
comfy.utils.flux_to_diffusers) and reads `<name>.alpha` for every layer whatever its naming
(load_lora), and diffusers loads them with their alphas too.

The hashes are kohya's (library/train_util.py, precalculate_safetensors_hashes), which A1111 shows
and civitai looks up: `sshs_model_hash` is the SHA-256 of the tensor data after the header (the
"addnet" hash); `sshs_legacy_hash` the first 8 hex digits of the SHA-256 of the 64 KiB at 1 MiB into
the file as written with only the `ss_*` metadata, so editing other metadata changes neither.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save, save_file

from lora_gui.atomic import atomic_path
from lora_gui.errors import LoraFileError
from lora_gui.families import Family

UNET_PREFIX = "lora_unet"
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"


def kohya_prefixes(family: type[Family]) -> dict[str, str]:
    """Pipeline component -> kohya's prefix for it."""
    return {
        family.denoiser_name: UNET_PREFIX,
        **dict(zip(family.text_encoder_names, family.kohya_text_encoder_prefixes, strict=True)),
    }


def kohya_name(prefix: str, module_path: str) -> str:
    """kohya's name of a module: its prefix and path joined, every "." as "_"."""
    return f"{prefix}.{module_path}".replace(".", "_")


def to_kohya(
    state: dict[str, torch.Tensor], adapter_configs: dict[str, dict[str, Any]], family: type[Family]
) -> dict[str, torch.Tensor]:
    """Convert a diffusers-layout LoRA (`<component>.<module>.lora_A.weight`, canonical names) to kohya's.

    `adapter_configs` holds each component's peft LoraConfig as a dict, as diffusers stores it.
    """
    prefixes = kohya_prefixes(family)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_")
        if component not in prefixes or part not in ("A.weight", "B.weight"):
            raise LoraFileError(f"{key} has no place in a kohya {family.title} LoRA (only plain LoRA layers have)")
        if family.kohya_module_names:
            name, down, up = kohya_name(prefixes[component], module), DOWN, UP
        else:
            name, down, up = f"{component}.{module}", "lora_A.weight", "lora_B.weight"
        if part == "A.weight":
            converted[f"{name}.{down}"] = tensor.contiguous()
            rank = tensor.shape[0]
            scale = _peft_scale(adapter_configs[component], module, rank)
            converted[f"{name}.{ALPHA}"] = torch.tensor(scale * rank, dtype=torch.float32)
        else:
            converted[f"{name}.{up}"] = tensor.contiguous()
    return converted


def _peft_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """The factor peft multiplies this module's update by, as the adapter was trained."""
    alpha = config["lora_alpha"]
    patterns = config.get("alpha_pattern") or {}
    if patterns:
        alpha = patterns.get(get_pattern_key(list(patterns), module), alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def addnet_hash(data: bytes) -> str:
    """SHA-256 of a safetensors file's tensor data: everything after the 8-byte length and the header."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length :]).hexdigest()


def legacy_hash(data: bytes) -> str:
    """sd-webui-additional-networks' old hash: 64 KiB from 1 MiB in (nothing, in files smaller than that)."""
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya computes them: over the file with `ss_*` metadata only."""
    training_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = save(tensors, training_only)
    return {"sshs_model_hash": addnet_hash(data), "sshs_legacy_hash": legacy_hash(data)}


def save_kohya_lora(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya-layout file with its metadata, the hashes A1111 shows and modelspec's content hash."""
    hashes = kohya_hashes(tensors, metadata)
    # modelspec.hash_sha256 hashes "all tensor content", the same bytes as the addnet hash.
    full = {**metadata, **hashes, "modelspec.hash_sha256": "0x" + hashes["sshs_model_hash"]}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=full)
    return target
