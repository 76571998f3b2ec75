"""Generating images with a base model and any number of LoRAs, each at its own strength."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lora_gui.errors import LoraFileError
from lora_gui.families import Family
from lora_gui.models import PICKLE_SUFFIXES, load_pipeline
from lora_gui.runs import DIFFUSERS_LORA

log = logging.getLogger(__name__)


@dataclass
class Generator:
    """A loaded base model that LoRAs can be put on and taken off, kept between generations."""

    family: type[Family]
    pipe: DiffusionPipeline
    device: torch.device

    @classmethod
    def load(cls, base_model: str, family: str = "auto") -> Generator:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        loaded_family, pipe = load_pipeline(base_model, family, dtype)
        pipe.to(device)
        return cls(loaded_family, pipe, device)

    def set_loras(self, loras: list[tuple[str | Path, float]], allow_pickle: bool = False) -> None:
        """Replace the active LoRAs with these (file or run folder, strength) pairs."""
        self.pipe.unload_lora_weights()
        names, scales = [], []
        for index, (source, scale) in enumerate(loras):
            path = resolve_lora_path(source, allow_pickle)
            name = f"lora{index}"
            try:
                self.pipe.load_lora_weights(str(path), adapter_name=name)
            except (ValueError, KeyError, RuntimeError, OSError) as error:
                self.pipe.unload_lora_weights()
                raise LoraFileError(
                    f"{path.name} can't be applied to this {self.family.title} model: {error}"
                ) from None
            names.append(name)
            scales.append(float(scale))
        if names:
            self.pipe.set_adapters(names, adapter_weights=scales)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = 25,
        guidance: float = 7.0,
        width: int | None = None,
        height: int | None = None,
    ) -> Image.Image:
        side = self.family.default_resolution
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.pipe(
            prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width or side,
            height=height or side,
            generator=generator,
        ).images[0]


def resolve_lora_path(source: str | Path, allow_pickle: bool = False) -> Path:
    """The LoRA file for a path that may be a file or a run folder; refuses pickles unless allowed."""
    path = Path(source).expanduser()
    if path.is_dir():
        candidate = path / DIFFUSERS_LORA
        if not candidate.is_file():
            raise LoraFileError(f"{path} holds no {DIFFUSERS_LORA}: has its training finished?")
        return candidate
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise LoraFileError(
            f"{path.name} is a pickled file, which can run any code on this computer when loaded. "
            "Use a .safetensors LoRA, or allow pickled files only if you trust where it came from"
        )
    if path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
        raise LoraFileError(f"{path.name} is not a LoRA file (expected .safetensors)")
    return path
