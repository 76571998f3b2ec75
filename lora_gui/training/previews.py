"""Preview images during a run: the sample prompts from a fixed seed, so they compare across the run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline

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

    @torch.no_grad()
    def make(self, step: int, total: int) -> None:
        device, precision = self.accelerator.device, self.accelerator.mixed_precision
        if self.accelerator.is_main_process and self.prompts:
            # One part at a time beside the denoiser: it denoises, then the VAE comes for the decoding.
            with devices.autocast(device, precision):
                embeddings = self.embeddings or [
                    self.family.prompt_embeddings(self.pipe, prompt, device) for prompt in self.prompts
                ]
                latents = [
                    self.pipe(
                        **prompt_embeddings,
                        num_inference_steps=self.config.sample_steps,
                        height=self.config.resolution,
                        width=self.config.resolution,
                        generator=torch.Generator(device=device).manual_seed(self.config.sample_seed + index),
                        output_type="latent",
                    ).images
                    for index, prompt_embeddings in enumerate(embeddings)
                ]
            side = self.config.resolution
            with self.offload.borrowed(self.pipe.vae):
                images = [decode(self.family, self.pipe, each, side, side)[0] for each in latents]
            paths = []
            for index, image in enumerate(images):
                path = self.run.samples / f"step-{step}-{index}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(str(path))
            self.emit(Event(events.SAMPLES, step, total, {"paths": paths, "prompts": self.prompts}))
        self.accelerator.wait_for_everyone()
