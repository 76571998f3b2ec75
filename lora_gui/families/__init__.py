"""Base-model families behind one interface, and telling which one a model is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_gui.errors import ModelLoadError
from lora_gui.families.base import Family, ImageGeometry
from lora_gui.families.chroma import Chroma
from lora_gui.families.flux import Flux1
from lora_gui.families.flux2 import Flux2Klein
from lora_gui.families.flux2_dev import Flux2Dev
from lora_gui.families.flux_kontext import FluxKontext
from lora_gui.families.qwen_image import QwenImage
from lora_gui.families.sdxl import StableDiffusionXL
from lora_gui.families.stable_diffusion import StableDiffusion1, StableDiffusion2
from lora_gui.families.zimage import ZImage

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

REGISTRY: dict[str, type[Family]] = {
    family.name: family
    for family in (
        StableDiffusion1,
        StableDiffusion2,
        StableDiffusionXL,
        Flux1,
        ZImage,
        Flux2Klein,
        Flux2Dev,
        Chroma,
        QwenImage,
        FluxKontext,
    )
}

__all__ = [
    "REGISTRY",
    "Family",
    "ImageGeometry",
    "base_for_training",
    "bench_models",
    "detect_family",
    "family_of_configs",
    "family_of_lora",
    "get_family",
]


def bench_models() -> dict[str, tuple[str, str, int]]:
    """The benchmark's models by name: (family, size in tiny.py, default resolution), as each family lists its own."""
    return {
        name: (family.name, size, resolution)
        for family in REGISTRY.values()
        for name, (size, resolution) in family.bench_models.items()
    }


def get_family(name: str) -> type[Family]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; known: {', '.join(REGISTRY)}") from None


def base_for_training(base_model: str) -> tuple[str, str]:
    """The model a run asked to train on `base_model` trains on, and the sentence saying why when that is another:
    a distilled model's base (`Family.distilled_bases`)."""
    wanted = base_model.strip().lower()
    for family in REGISTRY.values():
        for distilled, base in family.distilled_bases.items():
            if wanted == distilled.lower():
                return base, (
                    f"{distilled} is distilled to make pictures in a few steps, which training on it would undo: "
                    f"this run trains on {base}, the model it was distilled from, and the LoRA works on both."
                )
    return base_model, ""


def family_of_configs(model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> str | None:
    """The family a model's config files (model_index.json, text_encoder/config.json) show, by each family's
    `matches_files`; None when no family's do."""
    return next((f.name for f in REGISTRY.values() if f.matches_files(model_index, text_encoder_config)), None)


def detect_family(pipe: DiffusionPipeline, override: str = "auto") -> type[Family]:
    """The family of a loaded pipeline, read from its modules; `override` wins when it fits."""
    if override != "auto":
        family = get_family(override)
        if not isinstance(pipe, family.pipeline_class):
            raise ModelLoadError(
                f"the model was set to {family.title}, but it loads as a {type(pipe).__name__}; "
                "set the model family to auto"
            )
        return family
    for family in REGISTRY.values():
        if family.matches(pipe):
            return family
    raise ModelLoadError(
        f"this model is a {type(pipe).__name__}, which this trainer does not support yet; "
        f"supported: {', '.join(f.title for f in REGISTRY.values())}"
    )


def family_of_lora(keys: list[str]) -> type[Family]:
    """The family a LoRA file was made for, as its tensor names show it (`Family.lora_signatures`); the first family
    when they show none."""
    # The newest family first: a later family's LoRAs may hold an earlier one's signature too (Flux.1's names its
    # second text encoder as SDXL's does), never its own signature the other way round.
    for family in reversed(REGISTRY.values()):
        if any(key.startswith(family.lora_signatures) for key in keys):
            return family
    return next(iter(REGISTRY.values()))
