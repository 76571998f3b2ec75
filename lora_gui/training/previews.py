"""Preview images during a run: the sample prompts from a fixed seed, so they compare across the run. An edit run's
previews edit "before" pictures (held out of training where pictures are), each shown beside its picture."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from PIL import Image

from lora_gui import devices, events
from lora_gui.atomic import atomic_path
from lora_gui.config import TrainConfig
from lora_gui.events import Event, EventHandler
from lora_gui.families import Family
from lora_gui.infer import decode
from lora_gui.runs import RunFolder


@dataclass
class Previews:
    """Preview images for the sample prompts, from a fixed seed so they compare across the run."""

    accelerator: Accelerator
    pipe: DiffusionPipeline
    family: type[Family]
    config: TrainConfig
    run: RunFolder
    prompts: list[str]
    # The prompts' embeddings, made while the frozen text encoders were on the device for caching; None when
    # the text encoders train, which are on the device then and encode the prompts for each set anew.
    embeddings: list[dict[str, torch.Tensor]] | None
    offload: devices.Offload  # the denoiser is on the device; the VAE waits in CPU memory
    emit: EventHandler
    edits: list[Image.Image] | None = None  # an edit run's pictures to edit (fitted to their buckets), one per prompt

    @torch.no_grad()
    def make(self, step: int, total: int) -> None:
        device, precision = self.accelerator.device, self.accelerator.mixed_precision
        if self.accelerator.is_main_process and self.prompts:
            # One part at a time beside the denoiser: it denoises, then the VAE comes for the decoding (and for an edit
            # run, to encode the pictures to edit first).
            with devices.autocast(device, precision), self._vae_for_edits():
                embeddings = self.embeddings or [
                    self.family.prompt_embeddings(self.pipe, prompt, device) for prompt in self.prompts
                ]
                latents = [
                    self.pipe(
                        **prompt_embeddings,
                        **self._edit_options(index),
                        num_inference_steps=self.config.sample_steps,
                        height=self._size(index)[1],
                        width=self._size(index)[0],
                        generator=torch.Generator(device=device).manual_seed(self.config.sample_seed + index),
                        output_type="latent",
                    ).images
                    for index, prompt_embeddings in enumerate(embeddings)
                ]
            with self.offload.borrowed(self.pipe.vae):
                images = [
                    decode(self.family, self.pipe, each, self._size(index)[1], self._size(index)[0])[0]
                    for index, each in enumerate(latents)
                ]
            if self.edits:
                images = [side_by_side(before, image) for before, image in zip(self.edits, images, strict=True)]
            paths = []
            for index, image in enumerate(images):
                path = self.run.samples / f"step-{step}-{index}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(str(path))
            self.emit(Event(events.SAMPLES, step, total, {"paths": paths, "prompts": self.prompts}))
        self.accelerator.wait_for_everyone()

    def _size(self, index: int) -> tuple[int, int]:
        """Preview `index`'s (width, height): its picture to edit's, else the run's square."""
        return self.edits[index].size if self.edits else (self.config.resolution, self.config.resolution)

    def _edit_options(self, index: int) -> dict:
        if not self.edits:
            return {}
        return self.family.reference_options(self.pipe, [self.edits[index]], *self._size(index))

    def _vae_for_edits(self) -> AbstractContextManager:
        """The VAE on the device while an edit run's pipeline encodes its pictures to edit."""
        return self.offload.borrowed(self.pipe.vae) if self.edits else nullcontext()


def side_by_side(before: Image.Image, after: Image.Image) -> Image.Image:
    """An edit shown whole: the picture it started from on the left, the edited one on the right."""
    shown = Image.new("RGB", (before.width + after.width, max(before.height, after.height)), "white")
    shown.paste(before, (0, 0))
    shown.paste(after, (before.width, 0))
    return shown
