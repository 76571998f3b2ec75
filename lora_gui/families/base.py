"""The small interface every base-model family implements.

A family knows how to turn captions into the UNet's conditioning and which names its parts carry
in LoRA files. Everything else (loading, LoRA injection, the loop, saving) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training image came from: SDXL conditions on this; other families ignore it."""

    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in resized pixels
    target_size: tuple[int, int]  # (height, width) of the bucket


class Family:
    name: ClassVar[str]
    title: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    default_resolution: ClassVar[int]
    # Pipeline attributes of the text encoders and their tokenizers, in order.
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # kohya's prefix for each text encoder (A1111 / ComfyUI naming).
    kohya_text_encoder_prefixes: ClassVar[tuple[str, ...]] = ("lora_te",)
    # What kohya (ss_base_model_version) and Stability's modelspec call this architecture.
    kohya_base_model_version: ClassVar[str]
    modelspec_architecture: ClassVar[str]
    # The family's published Hub models, known by name before anything of them is downloaded.
    hub_models: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        """Whether a loaded pipeline is of this family, judged from its modules and configs."""
        raise NotImplementedError

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str) -> str:
        """Modelspec's name for a LoRA of this family whose base predicts `prediction_type`."""
        return cls.modelspec_architecture

    @classmethod
    def text_encoders(cls, pipe: DiffusionPipeline) -> list[torch.nn.Module]:
        return [getattr(pipe, name) for name in cls.text_encoder_names]

    @classmethod
    def tokenize(cls, pipe: DiffusionPipeline, captions: list[str]) -> list[torch.Tensor]:
        """Token ids for each tokenizer, padded to its full length as the pipelines do."""
        ids = []
        for name in cls.tokenizer_names:
            tokenizer = getattr(pipe, name)
            ids.append(
                tokenizer(
                    captions,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
        return ids

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of token ids: a dict of tensors with the batch first.

        `encoders` are the family's text encoders in order, as the caller runs them (wrapped for
        several processes when they train), on `device`."""
        raise NotImplementedError

    @classmethod
    def unet_kwargs(
        cls, conditioning: dict[str, torch.Tensor], geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, Any]:
        """Keyword arguments for `unet(noisy_latents, timesteps, **kwargs)`."""
        raise NotImplementedError
