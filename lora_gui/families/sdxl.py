"""Stable Diffusion XL (and its fine-tunes: Pony, Illustrious, NoobAI, Juggernaut, ...).

Two text encoders: the UNet reads both penultimate hidden states side by side, plus the second
encoder's pooled output and six "time ids" that tell it each image's original size, crop and
target size. Bucketing records those per image (ImageGeometry), so they are the real ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import Family, ImageGeometry, Imported

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    short_title = "SDXL"
    pipeline_class = Imported("diffusers", "StableDiffusionXLPipeline")
    default_resolution = 1024
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    kohya_text_encoder_prefixes = ("lora_te1", "lora_te2")
    hub_models = ("stabilityai/stable-diffusion-xl-base-1.0",)
    kohya_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    checkpoint_signatures = ("conditioner.embedders.1.",)
    text_width = 2048
    lora_signatures = ("lora_te2_", "text_encoder_2.")  # its second CLIP's layers
    text_encoder_params = 123e6 + 695e6
    random_text_encoders = ("clip-l", "openclip-g")
    random_vae: ClassVar[dict[str, Any]] = dict(scaling_factor=0.13025)
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {"sdxl": ("full", 1024)}
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
            norm_num_groups=8,
        ),
        "full": dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=1280 + 6 * 256,
            use_linear_projection=True,
        ),
    }

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, cls.pipeline_class)

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "StableDiffusionXLPipeline"

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        import torch

        hidden, pooled = [], None
        for encoder, ids in zip(encoders, token_ids, strict=True):
            output = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the second encoder's projected pooled output, as the pipeline uses it
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    @classmethod
    def unet_kwargs(
        cls, conditioning: dict[str, torch.Tensor], geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, Any]:
        import torch

        embeds = conditioning["encoder_hidden_states"]
        time_ids = torch.tensor(
            [[*g.original_size, *g.crop_top_left, *g.target_size] for g in geometry], device=device, dtype=embeds.dtype
        )
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids},
        }

    @classmethod
    def resolution_hint(cls, resolution: int) -> str:
        if resolution == cls.default_resolution:
            return ""
        return (
            f"{cls.title} models are made for {cls.default_resolution} px pictures, and Resolution is {resolution}. "
            f"Set it to {cls.default_resolution} (or use an SDXL preset) unless you mean to train smaller."
        )

    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        import torch

        return {
            **super().meta_inputs(resolution, dtype),
            "added_cond_kwargs": {
                "text_embeds": torch.empty(1, 1280, device="meta", dtype=dtype),
                "time_ids": torch.empty(1, 6, device="meta", dtype=dtype),
            },
        }

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        from diffusers import EulerDiscreteScheduler

        return cls.pipeline_class(
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            vae=vae,
            unet=cls.build_denoiser(size),
            scheduler=EulerDiscreteScheduler(**cls.noise_schedule, prediction_type="epsilon"),
            force_zeros_for_empty_prompt=True,
        )
