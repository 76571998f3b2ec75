"""Flux.2 dev (32B): Flux.2 klein's transformer at full size, reading Mistral-Small-3.x-24B, with a guidance input.

Everything klein's family does holds (flux2.py): the transformer's class and layer names, the VAE and its batch-norm
normalized patches, the packing and 4-axis position ids, the rectified-flow objective, Black Forest Labs' names in
single-file checkpoints and other tools' LoRAs, the file for ComfyUI. What differs:

- The text encoder is Mistral3ForConditionalGeneration. The pipeline wraps each caption in Mistral's chat template
  after its system message (diffusers' `format_input`, Black Forest Labs' wording), pads it to 512 tokens, and
  the transformer reads Mistral's hidden states after layers 10, 20 and 30 of its 40, side by side (3 x 5120 wide).
  It is frozen and encodes the captions and preview prompts once, then leaves the GPU.
- The transformer takes the guidance it was distilled with, as Flux.1-dev's does: training gives it 1, as diffusers'
  README_flux2.md trains dev (`--guidance_scale=1`; the script's default 3.5 is Flux.1's, its help text says so), and
  musubi-tuner and ai-toolkit do; pictures are made with 50 steps at guidance 4, the pipeline's defaults, in one
  transformer call a step (no negative prompt).
- It is told from klein by its pipeline (Flux2Pipeline in model_index.json), and its Black Forest Labs checkpoint
  (flux2-dev.safetensors) by the guidance input's layers (`guidance_in.`) beside Flux.2's shared modulation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import Imported
from lora_gui.families.flux2 import _CHECKPOINT_PREFIXES, Flux2Klein, _published_shape, batch_norm_statistics

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from diffusers import DiffusionPipeline

FLUX2_DEV = "black-forest-labs/FLUX.2-dev"
# Its single blocks: peft names layers by suffix, and `attn.to_out` alone would also name the double blocks' list of
# output layers, so the single blocks' are named one by one (as klein's).
_SINGLE_BLOCKS = 48
# Black Forest Labs' system message, which the pipeline puts before every prompt (diffusers' flux2/system_messages.py):
# the tiny tokenizer knows its words whole, so that the tiny model's 64 tokens leave room for the caption.
_SYSTEM_WORDS = tuple(
    "You are an AI that reasons about image descriptions . You give structured responses focusing on object "
    "relationships , object attribution and actions without speculation".split()
)


def _dev_shape(double: int, single: int) -> dict[str, Any]:
    """dev's width (48 heads of 128, reading Mistral's three 5120-wide hidden states) and guidance input, with these
    many blocks: the published transformer has 8 double and 48 single ones (diffusers' Flux2Transformer2DModel
    defaults)."""
    return {**_published_shape(double=double, single=single, heads=48, text_width=3 * 5120), "guidance_embeds": True}


class Flux2Dev(Flux2Klein):
    name = "flux2-dev"
    title = "Flux.2 dev"
    short_title = "Flux.2 dev"
    pipeline_class = Imported("diffusers", "Flux2Pipeline")
    default_target_modules = (
        *Flux2Klein.default_target_modules[:13],  # the blocks' layers but the single blocks' outputs
        *(f"single_transformer_blocks.{index}.attn.to_out" for index in range(_SINGLE_BLOCKS)),
    )
    kohya_base_model_version = "flux2"  # ai-toolkit's name for dev (its get_base_model_version)
    reference_images = 6  # Black Forest Labs' recommended most for dev (klein's 4)
    modelspec_architecture = "Flux.2-dev/lora"  # musubi-tuner's (utils/sai_model_spec.py)
    hub_models = (FLUX2_DEV,)
    distilled_bases: ClassVar[dict[str, str]] = {}
    # Its Black Forest Labs checkpoint: Flux.2's shared modulation (klein's signature) and a guidance input.
    guidance_signatures = tuple(f"{prefix}guidance_in." for prefix in _CHECKPOINT_PREFIXES)
    text_width = 3 * 5120
    # Its LoRAs show it by the single blocks klein has not (klein 9B has 24): its default layers reach all 48.
    lora_signatures = tuple(
        f"{prefix}{index}{separator}"
        for index in range(24, _SINGLE_BLOCKS)
        for prefix, separator in (
            ("transformer.single_transformer_blocks.", "."),
            ("diffusion_model.single_blocks.", "."),
            ("lora_unet_single_blocks_", "_"),
        )
    )
    prompt_tokens = 512  # the system message and chat template's tokens included, as the pipeline counts them
    tiny_prompt_tokens = 64  # the system message takes 35 of the tiny tokenizer's
    text_layers = (10, 20, 30)
    text_encoder_depth = 40
    # Mistral-Small-3.x-24B as published (its output layer its own), loaded whole as the pipeline loads it: only its
    # first 30 layers are read, but the rest are in its files and in memory while it encodes.
    text_encoder_params = 24.0e9
    # Streamed (it fits no common card whole: 48 GB in bf16): its embeddings and output head (671 M each), vision
    # tower (0.4 B) and one of its 40 layers (0.56 B) stay on the GPU.
    text_encoder_streamed_share = 0.1
    random_text_encoders = ("mistral3-24b",)
    tokenizer_words = _SYSTEM_WORDS
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {
        "flux2-dev-tiny": ("tiny", 128),
        "flux2-dev-shallow": ("shallow", 512),
        "flux2-dev": ("full", 1024),
    }
    reference_script = "train_dreambooth_lora_flux2.py"
    # Its defaults: the double blocks' q, k, v and output, and the single blocks' fused input and output.
    reference_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", *default_target_modules[13:])
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {**Flux2Klein.denoiser_shapes["tiny"], "guidance_embeds": True},  # tiny.py's Mistral is 32 wide too
        # dev's width with one of its 8 double blocks and 2 of its 48 single ones (each 0.5-1B): what a CPU holds.
        "shallow": _dev_shape(double=1, single=2),
        "full": _dev_shape(double=8, single=_SINGLE_BLOCKS),
    }
    default_steps = 50  # the pipeline's defaults, and Black Forest Labs' command line's
    default_guidance = 4.0
    # In bf16, its 32B transformer is 64 GB and Mistral 48 GB: one of them at a time fills a large card.
    too_large_for_one_gpu = "The whole of Flux.2 dev is 112 GB in bf16 (its 32B transformer and its 24B Mistral)"

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "Flux2Pipeline"

    @classmethod
    def is_checkpoint(cls, keys: list[str]) -> bool:
        """Flux.2's shared modulation, which Flux.1-dev's guidance input comes without, and a guidance input, which
        klein's come without."""
        return super().is_checkpoint(keys) and any(key.startswith(cls.guidance_signatures) for key in keys)

    @classmethod
    def variant(cls, pipe: DiffusionPipeline) -> str:
        return ""

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        return cls.modelspec_architecture

    @classmethod
    def estimate_model(cls, base_model: str, parameters_on_disk: int | None) -> tuple[str, float]:
        return "full", cls.text_encoder_params

    @classmethod
    def generation_defaults(cls, pipe: DiffusionPipeline) -> tuple[int, float]:
        return cls.default_steps, cls.default_guidance

    @classmethod
    def tokenize(cls, pipe: DiffusionPipeline, captions: list[str]) -> list[torch.Tensor]:
        """Each caption after the pipeline's system message in Mistral's chat template, padded as the pipeline pads
        it: the token ids, and the attention mask Mistral reads them with."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        tokens = pipe.tokenizer.apply_chat_template(
            format_input(captions, pipe.system_message),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=cls.prompt_length(pipe),
        )
        return [tokens["input_ids"], tokens["attention_mask"]]

    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The prompt's embeddings alone: the guidance is an input of the transformer, not a second prompt."""
        return {"prompt_embeds": pipe.encode_prompt(prompt=prompt, device=device, **cls.prompt_options(pipe))[0]}

    @classmethod
    def latents_for_vae(cls, pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The packed, normalized patches the pipeline returns as latents, as it decodes them: laid out by their
        position ids, the normalization undone, the patches unfolded."""
        grid = (height // (2 * pipe.vae_scale_factor), width // (2 * pipe.vae_scale_factor))
        ids = pipe._prepare_latent_ids(latents.new_empty(len(latents), 1, *grid)).to(latents.device)
        patches = Flux2Klein.pipeline_class._unpack_latents_with_ids(latents, ids, *grid)
        mean, std = batch_norm_statistics(pipe.vae, patches)
        return pipe._unpatchify_latents(patches * std + mean)

    @classmethod
    def single_file_companions(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        return (FLUX2_DEV,)

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        return cls.pipeline_class(**cls.random_components(size, tokenizers, text_encoders, vae))
