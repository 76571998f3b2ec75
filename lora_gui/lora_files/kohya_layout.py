"""The kohya layout of a LoRA: what AUTOMATIC1111, Forge and ComfyUI load.

Each adapted module becomes `<prefix>_<module path with "." as "_">` with three tensors:
`.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and a scalar `.alpha`. The tools
scale the update by alpha / rank (rank = lora_down's first dimension), so alpha is written as
the scale actually trained times the rank: the file means the same at strength 1.0 everywhere.

The other kinds of adapter are written as LyCORIS writes them, which ComfyUI (comfy/weight_adapter/), A1111
and Forge read by their suffixes beside the same `.alpha`: DoRA as a LoRA plus `.dora_scale`; LoHa as
`.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (peft's own names and orientation); LoKr as `.lokr_w1`
(or `.lokr_w1_a`/`.lokr_w1_b`) and `.lokr_w2` (or `.lokr_w2_a`/`.lokr_w2_b`). `lycoris_layers` and
`updated_weight` read such files (ours and other tools') back: what Generate applies.

Prefixes follow kohya's sd-scripts (networks/lora.py): `lora_unet` for the UNet, and one per
text encoder (`lora_te` for SD 1/2, `lora_te1`/`lora_te2` for SDXL) before the canonical CLIP
names, which start with `text_model.`. The UNet keeps diffusers' module paths: kohya writes those
for SD 1/2, and ComfyUI (comfy/lora.py, model_lora_keys_unet) and A1111 (networks.py,
convert_diffusers_name_to_compvis) map them for every Stable Diffusion UNet.

A family whose `kohya_module_names` is off (Flux.1) keeps diffusers' names whole
(`transformer.<module>.lora_A.weight`, `.lora_B.weight`) beside the same `.alpha`: ComfyUI maps
`transformer.<diffusers name>` onto Flux's own fused layers (comfy/lora.py, model_lora_keys_unet, through
comfy.utils.flux_to_diffusers) and reads `<name>.alpha` for every layer whatever its naming
(load_lora), and diffusers loads them with their alphas too. diffusers' loaders for Z-Image and Flux.2 don't
read alphas beside those names (Z-Image's misnames them, Flux.2's refuses them), so a family with
`kohya_alpha_folded` writes a plain LoRA's alpha / rank into its up weight instead and no `.alpha`: every tool
then applies the layer at the scale it was trained at (ComfyUI without an alpha, diffusers with peft's
alpha = rank).

The hashes are kohya's (library/train_util.py, precalculate_safetensors_hashes), which A1111 shows
and civitai looks up: `sshs_model_hash` is the SHA-256 of the tensor data after the header (the
"addnet" hash); `sshs_legacy_hash` the first 8 hex digits of the SHA-256 of the 64 KiB at 1 MiB into
the file as written with only the `ss_*` metadata, so editing other metadata changes neither.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save, save_file

from lora_gui.adapter_kinds import ADAPTER_KINDS, any_of, titles
from lora_gui.atomic import atomic_path
from lora_gui.errors import LoraFileError
from lora_gui.families import Family

UNET_PREFIX = "lora_unet"
DOWN, UP, ALPHA, DORA_SCALE = "lora_down.weight", "lora_up.weight", "alpha", "dora_scale"


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
    """Convert a diffusers-layout file's adapters (`<component>.<module>.<peft name>`, canonical names) to kohya's.

    `adapter_configs` holds each component's peft config as a dict, as diffusers stores it.
    """
    prefixes = kohya_prefixes(family)
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        if match is None or match[1] not in prefixes:
            raise LoraFileError(f"{key} has no place in a kohya {family.title} LoRA (only adapter layers have)")
        layers.setdefault((match[1], match[2]), {})[match[3]] = tensor
    converted: dict[str, torch.Tensor] = {}
    for (component, module), parts in layers.items():
        name = kohya_name(prefixes[component], module) if family.kohya_module_names else f"{component}.{module}"
        config = adapter_configs[component]
        tensors = _kohya_layer(parts, peft_scale(config, module), _peft_rank(config, module))
        if family.kohya_alpha_folded and set(tensors) == {DOWN, UP, ALPHA}:  # a plain LoRA's scale in its up weight
            scale = tensors[ALPHA] / tensors[DOWN].shape[0]
            tensors = {DOWN: tensors[DOWN], UP: (tensors[UP] * scale).to(tensors[UP].dtype)}
        if not family.kohya_module_names:  # diffusers' own names for a plain LoRA's factors (see above)
            tensors = {_DIFFUSERS_PARTS.get(part, part): tensor for part, tensor in tensors.items()}
        converted.update({f"{name}.{part}": tensor.contiguous() for part, tensor in tensors.items()})
    return converted


# A layer's tensors in a diffusers-layout file as peft names them, for every kind of adapter.
_PEFT_KEY = re.compile(
    rf"^([^.]+)\.(.+)\.({any_of(part for kind in ADAPTER_KINDS.values() for part in kind.peft_parts)})$"
)
_DIFFUSERS_PARTS = {DOWN: "lora_A.weight", UP: "lora_B.weight"}


def _kohya_layer(parts: dict[str, torch.Tensor], scale: float, rank: int) -> dict[str, torch.Tensor]:
    """One layer's tensors under LyCORIS' names, which ComfyUI (comfy/weight_adapter/lora.py, loha.py, lokr.py) and
    A1111 (extensions-builtin/Lora/network_*.py) read, with the alpha that makes them mean what peft trained.

    The tools scale a layer's update by alpha over the rank its tensors show (lora_down's rows, hada_w1_b's rows,
    the rows of LoKr's last low-rank factor); peft scales by alpha / r. LoKr with both factors whole is applied
    unscaled there (its alpha unread), so peft's scale goes into lokr_w2 itself."""
    if "lora_A.weight" in parts:
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        tensors = {DOWN: down, UP: up}
        if "lora_magnitude_vector" in parts:
            # DoRA: peft keeps one length per output row, shaped (out,); LyCORIS (wd_on_output) writes them as
            # (out, 1) (or (out, 1, 1, 1) for a convolution), the shape by which ComfyUI and LyCORIS tell that
            # the lengths are the output rows' rather than the input columns' (1, in) that A1111 reads.
            magnitude = parts["lora_magnitude_vector"]
            tensors[DORA_SCALE] = magnitude.reshape(up.shape[0], *[1] * (down.dim() - 1))
        shown_rank = down.shape[0]
    elif "hada_w1_a" in parts:
        tensors, shown_rank = dict(parts), parts["hada_w1_b"].shape[0]
    else:
        tensors = dict(parts)
        low_rank = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        if low_rank is None:
            tensors["lokr_w2"] = parts["lokr_w2"] * scale
            scale, shown_rank = 1.0, rank
        else:
            shown_rank = low_rank.shape[0]
    tensors[ALPHA] = torch.tensor(scale * shown_rank, dtype=torch.float32)
    return tensors


def _peft_rank(config: dict[str, Any], module: str) -> int:
    ranks = config.get("rank_pattern") or {}
    return ranks.get(get_pattern_key(list(ranks), module), config["r"]) if ranks else config["r"]


def peft_scale(config: dict[str, Any], module: str) -> float:
    """The factor peft multiplies this module's update by, as the adapter was trained."""
    alpha = config["lora_alpha"] if "lora_alpha" in config else config["alpha"]  # LoraConfig's, or LyCORIS'
    patterns = config.get("alpha_pattern") or {}
    if patterns:
        alpha = patterns.get(get_pattern_key(list(patterns), module), alpha)
    rank = _peft_rank(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# Every tensor of a layer in a file of any kind, by the suffixes ComfyUI's adapters read (comfy/weight_adapter/
# lora.py, loha.py, lokr.py), and peft's names for DoRA's lengths and LoRA's factors (diffusers' layout).
_LAYER_PART = re.compile(rf"^(.+)\.({any_of(part for kind in ADAPTER_KINDS.values() for part in kind.file_parts)})$")


def lycoris_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA, DoRA, LoHa or LoKr file's tensors by layer: {layer name: {suffix: tensor}}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key in tensors.keys():  # noqa: SIM118 (a TensorFile is not iterable)
        match = _LAYER_PART.match(key)
        if match is None:
            raise LoraFileError(f"{key} is no part of a {titles()} layer")
        layers.setdefault(match[1], {})[match[2]] = tensors[key]
    return layers


def weight_change(parts: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """How one layer's `weight` changes at strength 1 (in fp32), as ComfyUI computes it (comfy/weight_adapter/).

    DoRA's lengths (`dora_scale`) are of the output rows when there is one per row, else of the input columns;
    either way they divide the updated weight's lengths, as LyCORIS and peft do (ComfyUI, for output rows,
    divides the base weight's: a slightly different picture)."""
    f = {part: tensor.to(weight.device, torch.float32) for part, tensor in parts.items()}
    if "hada_w1_a" in f:
        if "hada_t1" in f:  # Tucker-decomposed convolution
            first = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
            second = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
        else:
            first, second = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        change, rank = first * second, f["hada_w1_b"].shape[0]
    elif "lokr_w1" in f or "lokr_w1_a" in f:
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        low_rank = f.get("lokr_w2_b", f.get("lokr_w1_b"))
        change, rank = torch.kron(w1, w2), None if low_rank is None else low_rank.shape[0]
    else:
        down, up = f.get(DOWN, f.get("lora_A.weight")), f.get(UP, f.get("lora_B.weight"))
        if down is None or up is None:
            raise LoraFileError(f"a layer with only {', '.join(sorted(parts))} is incomplete")
        change, rank = up.flatten(1) @ down.flatten(1), down.shape[0]
    scale = f[ALPHA].item() / rank if ALPHA in f and rank else 1.0  # without alpha or a low rank: unscaled
    change = change.reshape(weight.shape) * scale
    lengths = f.get(DORA_SCALE, f.get("lora_magnitude_vector"))
    if lengths is None:
        return change
    base = weight.float()
    updated = base + change
    if lengths.shape[0] == weight.shape[0]:
        norm = updated.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = updated.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    return updated * (lengths.reshape(norm.shape) / norm) - base


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
