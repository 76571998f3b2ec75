"""Stable Diffusion XL (and its fine-tunes: Pony, Illustrious, NoobAI, Juggernaut, ...).

Two text encoders: the UNet reads both penultimate hidden states side by side, plus the second
encoder's pooled output and six "time ids" that tell it each image's original size, crop and
target size. Bucketing records those per image (ImageGeometry), so they are the real ones.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from lora_gui.families.base import Family, ImageGeometry


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = StableDiffusionXLPipeline
    default_resolution = 1024
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    kohya_text_encoder_prefixes = ("lora_te1", "lora_te2")
    hub_models = ("stabilityai/stable-diffusion-xl-base-1.0",)
    kohya_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, StableDiffusionXLPipeline)

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for encoder, ids in zip(encoders, token_ids, strict=True):
            output = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the second encoder's projected pooled output, as the pipeline uses it
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    @classmethod
    def unet_kwargs(
        cls, conditioning: dict[str, torch.Tensor], geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, Any]:
        embeds = conditioning["encoder_hidden_states"]
        time_ids = torch.tensor(
            [[*g.original_size, *g.crop_top_left, *g.target_size] for g in geometry], device=device, dtype=embeds.dtype
        )
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids},
        }
