"""Flux.1 Kontext (dev): Flux.1 taught to edit a picture as an instruction says. Its LoRAs are edit LoRAs, trained on
before/after pairs (run_dataset.py) with the instruction as the caption.

Everything but the picture to edit is Flux.1-dev's (the family this one extends): the transformer, its guidance input,
CLIP and T5, the VAE, the objective, the layer names and the files. The "before" picture joins as Kontext's pipeline
joins it (diffusers' FluxKontextPipeline): its latents, packed into 2x2 patches as the noisy ones are, follow them in
the transformer's sequence, with the same position ids but a first coordinate of 1 that tells them apart; the
transformer's prediction for them is cut off. Training encodes each "before" picture once (cache.py), at its "after"
picture's bucket, and takes its mean, as the pipeline does.

Files: a Kontext LoRA is a Flux.1 LoRA (ComfyUI's Kontext is its Flux model, reading the "before" picture as a
reference latent), so the file for ComfyUI and Forge keeps diffusers' `transformer.` names, as Flux.1's does. Black
Forest Labs' single-file Kontext checkpoint holds the same tensors as Flux.1-dev's, so a single file loads as Flux.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import Imported
from lora_gui.families.flux import Flux1

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

KONTEXT_DEV = "black-forest-labs/FLUX.1-Kontext-dev"


class FluxKontext(Flux1):
    name = "flux-kontext"
    title = "Flux.1 Kontext"
    short_title = "Kontext"
    pipeline_class = Imported("diffusers", "FluxKontextPipeline")
    reference_images = 1
    modelspec_architecture = "flux-1-kontext-dev/lora"
    hub_models = (KONTEXT_DEV,)
    # Its single files and LoRAs are Flux.1-dev's tensors under Flux.1-dev's names: nothing in them tells Kontext.
    checkpoint_signatures = ()
    lora_signatures = ()
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {}
    reference_script = "train_dreambooth_lora_flux_kontext.py"
    # Black Forest Labs' usual settings for an edit: 28 steps at guidance 2.5.
    default_guidance = 2.5
    too_large_for_one_gpu = "The whole of Flux.1 Kontext is ~33 GB"

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "FluxKontextPipeline"

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        return cls.modelspec_architecture

    @classmethod
    def single_file_companions(cls, tensors: Any) -> tuple[str, ...]:
        return cls.hub_models

    @classmethod
    def image_tokens(
        cls, noisy: torch.Tensor, conditioning: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy latents' patches and then the "before" picture's, with their position ids: the same places, told
        apart by a first coordinate of 1 (FluxKontextPipeline.prepare_latents)."""
        import torch

        tokens, ids = super().image_tokens(noisy, conditioning)
        reference = conditioning["reference_latents"].to(noisy.dtype)
        reference_tokens, reference_ids = super().image_tokens(reference, conditioning)
        reference_ids[..., 0] = 1
        return torch.cat([tokens, reference_tokens], dim=1), torch.cat([ids, reference_ids], dim=0)

    @classmethod
    def reference_options(
        cls, pipe: DiffusionPipeline, images: list[Image.Image], width: int, height: int
    ) -> dict[str, Any]:
        """The picture to edit, already fitted to the picture to make; the pipeline is kept from resizing it to one
        of Kontext's 1 MP sizes, and from resizing the picture it makes to 1 MP (also without a picture to edit)."""
        return {"image": images[0] if images else None, "max_area": width * height, "_auto_resize": False}

    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        """Flux.1's, with the "before" picture's patches after the noisy ones: twice the picture's tokens."""
        import torch

        inputs = super().meta_inputs(resolution, dtype)
        for name in ("hidden_states", "img_ids"):
            inputs[name] = torch.cat([inputs[name], inputs[name]], dim=-2)
        return inputs
