"""Generating images with a base model and any number of LoRAs, each at its own strength."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft.tuners.lora import LoraLayer
from PIL import Image

from lora_gui import layouts
from lora_gui.errors import LoraFileError, OutOfMemoryError
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
        with _out_of_memory_said_plainly("loading the model"):
            pipe.to(device)
        return cls(loaded_family, pipe, device)

    def set_loras(self, loras: list[tuple[str | Path, float]], allow_pickle: bool = False) -> None:
        """Replace the active LoRAs with these (file or run folder, strength) pairs.

        Files from anywhere load: diffusers', kohya's (A1111, ComfyUI, civitai) and the LyCORIS kinds
        diffusers can apply. One that can't be applied raises LoraFileError naming its layout and
        why, and leaves no LoRA active.
        """
        self.pipe.unload_lora_weights()
        names, scales = [], []
        try:
            for index, (source, scale) in enumerate(loras):
                names.append(f"lora{index}")
                self._load_lora(resolve_lora_path(source, allow_pickle), names[-1])
                scales.append(float(scale))
        except LoraFileError:
            self.pipe.unload_lora_weights()
            raise
        if names:
            self.pipe.set_adapters(names, adapter_weights=scales)

    def _load_lora(self, path: Path, name: str) -> None:
        """Put one LoRA file on the model as adapter `name`, after checking it can mean what it says."""
        shapes = layouts.read_shapes(path)
        layout = layouts.detect_layout(list(shapes))
        if layout.problem:
            raise LoraFileError(f"{path.name} is a {layout.name} file, which can't be used here: {layout.problem}")
        other_model = layouts.made_for_other_model(shapes, self.pipe)
        if other_model:
            raise LoraFileError(
                f"{path.name} ({layout.name}) was made for {other_model}; this base model is {self.family.title}. "
                "Pick a LoRA made for this model, or a base model of that kind"
            )
        try:
            with warnings.catch_warnings():
                # peft warns whenever a second adapter joins a model; several LoRAs at once is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as error:  # diffusers raises many kinds; whatever it is, the file does not fit
            log.debug("Loading %s failed", path, exc_info=True)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LoraFileError(
                f"{path.name} ({layout.name}) can't be applied to this {self.family.title} model: {reason}"
            ) from None
        applied, in_file = self._adapted_layers(name), layouts.count_lora_modules(list(shapes))
        if applied < in_file:
            raise LoraFileError(
                f"only {applied} of the {in_file} layers in {path.name} ({layout.name}) exist in this "
                f"{self.family.title} model: it was made for another base model"
            )
        log.info("Loaded %s (%s, %d layers)", path.name, layout.name, applied)

    def _adapted_layers(self, adapter: str) -> int:
        """How many layers of the UNet and text encoders carry this LoRA adapter."""
        modules = ("unet", *self.family.text_encoder_names)
        return sum(
            1
            for component in modules
            for module in getattr(self.pipe, component).modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A
        )

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
        with _out_of_memory_said_plainly("making the picture"):
            return self.pipe(
                prompt,
                negative_prompt=negative_prompt or None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width or side,
                height=height or side,
                generator=generator,
            ).images[0]


@contextlib.contextmanager
def _out_of_memory_said_plainly(doing: str) -> Iterator[None]:
    """Generation shares the GPU with any training run: running out of memory is a message, not a crash."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(
            f"the GPU ran out of memory while {doing}. If a training run is going, it needs that memory: "
            "generate after it finishes (or stop it), or make smaller pictures"
        ) from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
