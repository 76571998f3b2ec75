"""Flux checkpoints in Black Forest Labs' own single-file layout (flux1-dev.safetensors, and all-in-one files), written
from a diffusers transformer by names written out here independently of lora_gui."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# Black Forest Labs' layers -> the diffusers layers each holds, stacked along its outputs; written out here from
# their flux/model.py and diffusers' convert_flux_transformer_checkpoint_to_diffusers, independently of lora_gui.
TOP_LAYERS = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # (shift, scale) where diffusers has (scale, shift)
}
DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
SINGLE = {
    "modulation.lin": ["norm.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
}
# The attention's RMSNorm scales, which full checkpoints hold and LoRAs don't adapt.
DOUBLE_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def bfl_layers(config) -> dict[str, list[str]]:
    layers = {name: list(targets) for name, targets in TOP_LAYERS.items()}
    if not config.guidance_embeds:
        layers = {name: targets for name, targets in layers.items() if not name.startswith("guidance_in")}
    for index in range(config.num_layers):
        for name, targets in DOUBLE.items():
            layers[f"double_blocks.{index}.{name}"] = [f"transformer_blocks.{index}.{t}" for t in targets]
    for index in range(config.num_single_layers):
        for name, targets in SINGLE.items():
            layers[f"single_blocks.{index}.{name}"] = [f"single_transformer_blocks.{index}.{t}" for t in targets]
    return layers


def swapped(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2)
    return torch.cat([second, first])


def bfl_checkpoint(transformer: torch.nn.Module, path: Path, prefix: str = "", **others: torch.Tensor) -> Path:
    """A Flux transformer in Black Forest Labs' own single-file layout, under `prefix` (an all-in-one file's
    model.diffusion_model.), beside `others` (an all-in-one file's VAE and text encoders)."""
    state, config = transformer.state_dict(), transformer.config
    tensors = dict(others)
    for original, targets in bfl_layers(config).items():
        for parameter in ("weight", "bias"):
            value = torch.cat([state[f"{target}.{parameter}"] for target in targets])
            tensors[f"{prefix}{original}.{parameter}"] = (
                swapped(value) if original.startswith("final_layer.ada") else value
            )
    for kind, block, count, norms in (
        ("double_blocks", "transformer_blocks", config.num_layers, DOUBLE_NORMS),
        ("single_blocks", "single_transformer_blocks", config.num_single_layers, SINGLE_NORMS),
    ):
        for index in range(count):
            for original, target in norms.items():
                tensors[f"{prefix}{kind}.{index}.{original}.scale"] = state[f"{block}.{index}.{target}.weight"]
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path
