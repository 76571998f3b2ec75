"""What the rectified-flow transformer families (Flux.1, Z-Image, Flux.2 klein, Qwen-Image) share, and Black Forest
Labs' layer names, which Flux.1's and Flux.2's original checkpoints and the LoRAs of kohya, musubi-tuner and ComfyUI
use.

Each of these families trains a transformer (never its text encoders) on the velocity from the picture to the noise
(objectives.FlowMatching, through the base's own flow-matching scheduler, which previews sample with too), reads
latents in 2x2 patches, and keeps diffusers' layer names in its file for ComfyUI."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lora_gui.families.base import Family

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from lora_gui.objectives import Objective


class RectifiedFlowTransformer(Family):
    default_resolution = 1024
    denoiser_name = "transformer"
    denoiser_title = "transformer"
    trains_text_encoders = False
    kohya_module_names = False
    kohya_file_loads_in = "Forge and ComfyUI"  # AUTOMATIC1111 runs Stable Diffusion only

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, cls.pipeline_class)

    @classmethod
    def bucket_step(cls, pipe: DiffusionPipeline) -> int:
        """The VAE's downsampling, times 2 for the 2x2 patches the transformer reads."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1) * 2

    @classmethod
    def objective(cls, pipe: DiffusionPipeline, snr_gamma: float) -> Objective:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from lora_gui.objectives import FlowMatching

        return FlowMatching(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config))

    @classmethod
    def preview_scheduler(cls, pipe: DiffusionPipeline) -> Any:
        """Its own flow-matching sampler, with the shift its pipeline gives it."""
        return pipe.scheduler


# A LoRA file's tensor name: its layer, and which of kohya's or peft's tensors of it this is.
_LORA_TENSORS = re.compile(r"(.+)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)")
_FACTORS = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up"}


def lora_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, str]] | None:
    """A LoRA file's tensors by the layer they adapt, in kohya's names or peft's alike: {layer: {"down": key, "up": key,
    "alpha": key}}; None for a file holding other tensors (a layout diffusers converts itself, such as LoKr)."""
    layers: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _LORA_TENSORS.fullmatch(key)
        if match is None:
            return None
        layer, part = match.groups()
        layers.setdefault(layer, {})[_FACTORS.get(part, part)] = key
    return layers


def scaled_factors(tensors: Mapping[str, torch.Tensor], parts: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (down, up) weights with its alpha / rank folded into down, as diffusers loads them at scale 1; raises
    KeyError for a layer without both."""
    down, up = tensors[parts["down"]], tensors[parts["up"]]
    alpha = tensors[parts["alpha"]].item() if "alpha" in parts else down.shape[0]
    return down * (alpha / down.shape[0]), up


# The final layer's modulation gives (shift, scale) where diffusers' norm_out gives (scale, shift).
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"


class BlackForestLabsNames:
    """Black Forest Labs' name of each transformer layer (`double_blocks.N.img_attn.qkv`, or as kohya writes it,
    `double_blocks_N_img_attn_qkv`) -> the diffusers layers it holds, stacked along its outputs in that order.

    `top` names the layers outside the blocks; `double` and `single` a block's layers, within the block."""

    def __init__(
        self, top: dict[str, tuple[str, ...]], double: dict[str, tuple[str, ...]], single: dict[str, tuple[str, ...]]
    ) -> None:
        self.top = top
        # BFL's kind of block -> diffusers' list of those blocks, and their layers.
        self.blocks = {
            "double_blocks": ("transformer_blocks", double),
            "single_blocks": ("single_transformer_blocks", single),
        }
        # kohya's spelling of each layer name ("." as "_") -> the dotted name.
        self.underscored = {name.replace(".", "_"): name for table in (top, double, single) for name in table}

    def find(self, name: str) -> tuple[str, tuple[str, ...]] | None:
        """A layer's dotted name and the diffusers layers it holds; None for a name that is not one of them."""
        block = re.fullmatch(r"(double_blocks|single_blocks)[._](\d+)[._](.+)", name)
        if block is None:
            dotted = self.underscored.get(name, name)
            return (dotted, self.top[dotted]) if dotted in self.top else None
        kind, index, layer = block.groups()
        diffusers_block, layers = self.blocks[kind]
        layer = self.underscored.get(layer, layer)
        if layer not in layers:
            return None
        return f"{kind}.{index}.{layer}", tuple(f"{diffusers_block}.{index}.{target}" for target in layers[layer])

    def weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        prefix: str,
        split: Callable[[torch.Tensor, int, str], list[torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A checkpoint's transformer (its tensors under `prefix`) in diffusers' names: each fused layer's weight and
        bias cut by `split(tensor, parts, name)` into the layers it holds; and the names of the tensors that are no
        layer's."""
        weights: dict[str, torch.Tensor] = {}
        unknown = []
        for key in (key for key in tensors if key.startswith(prefix)):
            layer, _, parameter = key[len(prefix) :].rpartition(".")
            found = self.find(layer)
            if found is None or parameter not in ("weight", "bias", "scale"):
                unknown.append(key)
                continue
            original, targets = found
            value = swap_halves(tensors[key]) if original == SWAPPED_HALVES else tensors[key]
            for target, part in zip(targets, split(value, len(targets), key), strict=True):
                weights[f"{target}.{'weight' if parameter == 'scale' else parameter}"] = part
        return weights, unknown


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """`SWAPPED_HALVES`' weight (or LoRA up weight) in diffusers' order."""
    import torch

    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
