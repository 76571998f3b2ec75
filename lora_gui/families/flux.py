"""Flux.1 (dev and schnell, and their fine-tunes): a rectified-flow transformer.

Two text encoders: CLIP-L gives a pooled vector, T5-XXL the token sequence the transformer attends to
(T5 is 9.5 GB in bf16: it encodes the captions and preview prompts once, then leaves the GPU). Latents
have 16 channels and reach the transformer as 2x2 patches ("packed"), with a position id for each
patch and each text token; Flux.1-dev also takes the guidance it was distilled with, which training
sets to 1. It learns to predict the velocity from the picture to the noise (objectives.FlowMatching),
as diffusers' Flux LoRA script trains it. The LoRA trains on the transformer alone: T5 stays frozen,
and so does CLIP here.

The file for ComfyUI and Forge keeps diffusers' `transformer.` names with each layer's alpha: see
lora_files/kohya_layout.py for where ComfyUI's code maps them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)

from lora_gui.families.base import Family, ImageGeometry
from lora_gui.objectives import FlowMatching, Objective

# The guidance Flux.1-dev's guidance embedding gets while its LoRA trains, as kohya's and ai-toolkit's
# trainers set it: the distilled guidance is a sampling knob, and training at 1 keeps it free to use.
TRAINING_GUIDANCE = 1.0


class Flux1(Family):
    name = "flux"
    title = "Flux.1"
    short_title = "Flux"
    pipeline_class = FluxPipeline
    default_resolution = 1024
    denoiser_name = "transformer"
    denoiser_class = FluxTransformer2DModel
    denoiser_title = "transformer"
    # Attention and MLP projections of the double blocks (diffusers' Flux LoRA script's set), and of the
    # single blocks: their attention's q, k, v (the same names) and their MLP's input.
    default_target_modules = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    )
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    trains_text_encoders = False
    kohya_text_encoder_prefixes = ("lora_te1", "lora_te2")
    kohya_module_names = False
    kohya_network_module = "networks.lora_flux"
    kohya_base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    hub_models = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
    # Black Forest Labs' own layout: the transformer alone, or inside an all-in-one checkpoint.
    checkpoint_signatures = ("double_blocks.", "model.diffusion_model.double_blocks.")
    text_width = 4096  # T5-XXL's
    text_encoder_params = 123e6 + 4.76e9
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        # Flux.1's width with one of its 19 double blocks and two of its 38 single ones: a 1/19 slice that a CPU
        # holds, whose speed scales to the whole model's block by block.
        "shallow": dict(num_layers=1, num_single_layers=2, guidance_embeds=True),
        "full": dict(guidance_embeds=True),  # FluxTransformer2DModel's defaults are Flux.1's shape
    }
    default_steps = 28
    default_guidance = 3.5
    negative_prompt = False

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, FluxPipeline)

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "FluxPipeline"

    @classmethod
    def variant(cls, pipe: DiffusionPipeline) -> str:
        return "dev" if pipe.transformer.config.guidance_embeds else "schnell"

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        return f"flux-1-{variant or 'dev'}/lora"

    @classmethod
    def bucket_step(cls, pipe: DiffusionPipeline) -> int:
        """The VAE's downsampling, times 2 for the 2x2 patches the transformer reads."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1) * 2

    @classmethod
    def cross_attention_width(cls, pipe: DiffusionPipeline) -> int:
        return pipe.transformer.config.joint_attention_dim

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        (clip, t5), (clip_ids, t5_ids) = encoders, token_ids
        return {
            "prompt_embeds": t5(t5_ids.to(device), output_hidden_states=False)[0],
            "pooled_prompt_embeds": clip(clip_ids.to(device), output_hidden_states=False).pooler_output,
        }

    @classmethod
    def objective(cls, pipe: DiffusionPipeline, snr_gamma: float) -> Objective:
        return FlowMatching(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config))

    @classmethod
    def predict(
        cls,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        geometry: list[ImageGeometry],
    ) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        text = conditioning["prompt_embeds"]
        config = getattr(denoiser, "module", denoiser).config  # several processes wrap it
        guidance = torch.full((batch,), TRAINING_GUIDANCE, device=noisy.device) if config.guidance_embeds else None
        prediction = denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, batch, channels, height, width),
            timestep=timesteps / 1000,  # the transformer scales it back to the schedule's timesteps
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        # Unpacked as the pipeline does for pictures of the latents' own size (a VAE factor of 1).
        return FluxPipeline._unpack_latents(prediction, height, width, 1)

    @classmethod
    def preview_scheduler(cls, pipe: DiffusionPipeline) -> Any:
        """Its own flow-matching sampler, which its pipeline shifts for the picture's size."""
        return pipe.scheduler

    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @classmethod
    def latents_for_vae(cls, pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        patches, tokens = (resolution // 16) ** 2, 512
        return dict(
            hidden_states=torch.empty(1, patches, 64, device="meta", dtype=dtype),
            encoder_hidden_states=torch.empty(1, tokens, cls.text_width, device="meta", dtype=dtype),
            pooled_projections=torch.empty(1, 768, device="meta", dtype=dtype),
            timestep=torch.zeros(1, device="meta", dtype=dtype),
            img_ids=torch.zeros(patches, 3, device="meta", dtype=dtype),
            txt_ids=torch.zeros(tokens, 3, device="meta", dtype=dtype),
            guidance=torch.ones(1, device="meta", dtype=dtype),
        )

    @classmethod
    def checkpointed_blocks(cls) -> tuple[type[torch.nn.Module], ...]:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        return (FluxTransformerBlock, FluxSingleTransformerBlock)

    @classmethod
    def random_pipeline(cls, size: str) -> DiffusionPipeline:
        from lora_gui import tiny

        (clip_tokenizer,), (clip,) = tiny.clip_text_parts(("clip-l",), size)
        t5_tokenizer, t5 = tiny.t5_text_parts(size)
        vae = tiny.vae(
            size,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        # Flux.1-dev's schedule: shifted by the picture's size when sampling (dynamic shifting).
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip,
            tokenizer=clip_tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=cls.build_denoiser(size),
        )
