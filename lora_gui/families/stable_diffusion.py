"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, conditioning on its last hidden states.

The two differ only in their text encoder (OpenAI CLIP with quick-GELU vs OpenCLIP with GELU),
their resolution and, for the 768 px models, v-prediction, which the loop reads from the
scheduler config, so they share everything but their names.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from lora_gui.families.base import Family, ImageGeometry


class StableDiffusion1(Family):
    name = "sd15"
    title = "Stable Diffusion 1.x"
    pipeline_class = StableDiffusionPipeline
    default_resolution = 512
    kohya_base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    hub_models = (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "runwayml/stable-diffusion-v1-5",
        "CompVis/stable-diffusion-v1-4",
    )

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, StableDiffusionPipeline) and pipe.text_encoder.config.hidden_act == "quick_gelu"

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        ((encoder,), (ids,)) = encoders, token_ids
        return {"encoder_hidden_states": encoder(ids.to(device))[0]}

    @classmethod
    def unet_kwargs(
        cls, conditioning: dict[str, torch.Tensor], geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, Any]:
        return {"encoder_hidden_states": conditioning["encoder_hidden_states"]}


class StableDiffusion2(StableDiffusion1):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    default_resolution = 768
    kohya_base_model_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2-768-v/lora"
    hub_models = (
        "stabilityai/stable-diffusion-2-1",
        "stabilityai/stable-diffusion-2-1-base",
        "stabilityai/stable-diffusion-2",
        "stabilityai/stable-diffusion-2-base",
    )

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, StableDiffusionPipeline) and pipe.text_encoder.config.hidden_act != "quick_gelu"

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str) -> str:
        # SD 2's 512 px base predicts noise; only the 768 px models predict velocity.
        return cls.modelspec_architecture if prediction_type == "v_prediction" else "stable-diffusion-v2-512/lora"
