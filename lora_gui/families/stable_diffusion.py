"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, conditioning on its last hidden states.

The two differ only in their text encoder (OpenAI CLIP with quick-GELU vs OpenCLIP with GELU),
their resolution and, for the 768 px models, v-prediction, which the objective reads from the
scheduler config, so they share everything but their names and shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import Family, ImageGeometry, Imported

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


class StableDiffusion1(Family):
    name = "sd15"
    title = "Stable Diffusion 1.x"
    short_title = "SD 1.5"
    pipeline_class = Imported("diffusers", "StableDiffusionPipeline")
    default_resolution = 512
    kohya_base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    hub_models = (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "runwayml/stable-diffusion-v1-5",
        "CompVis/stable-diffusion-v1-4",
    )
    checkpoint_signatures = ("cond_stage_model.transformer.",)
    text_width = 768
    text_encoder_params = 123e6
    # UNet2DConditionModel's own defaults are SD 1.x's, so "full" lists changes only.
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        "full": dict(sample_size=64, cross_attention_dim=768),
    }
    random_text_encoders = ("clip-l",)
    random_vae: ClassVar[dict[str, Any]] = dict(scaling_factor=0.18215)
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {"tiny": ("tiny", 128), "sd15": ("full", 512)}
    _quick_gelu = True  # OpenAI's CLIP uses quick-GELU, OpenCLIP plain GELU: that tells SD 1.x from 2.x

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        # The pipeline's class first: other families' text encoders (Chroma's T5, Qwen2.5-VL, Mistral3) have no
        # hidden_act.
        if not isinstance(pipe, cls.pipeline_class):
            return False
        return (pipe.text_encoder.config.hidden_act == "quick_gelu") == cls._quick_gelu

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        if model_index.get("_class_name") != "StableDiffusionPipeline" or not text_encoder_config:
            return False
        return (text_encoder_config.get("hidden_act") == "quick_gelu") == cls._quick_gelu

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        ((encoder,), (ids,)) = encoders, token_ids
        return {"encoder_hidden_states": encoder(ids.to(device))[0]}

    @classmethod
    def unet_kwargs(
        cls, conditioning: dict[str, torch.Tensor], geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, Any]:
        return {"encoder_hidden_states": conditioning["encoder_hidden_states"]}

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        ((tokenizer,), (text_encoder,)) = tokenizers, text_encoders
        return cls.pipeline_class(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            unet=cls.build_denoiser(size),
            scheduler=cls._scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @classmethod
    def _scheduler(cls):
        from diffusers import PNDMScheduler

        return PNDMScheduler(
            **cls.noise_schedule, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon"
        )


class StableDiffusion2(StableDiffusion1):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    short_title = "SD 2"
    default_resolution = 768
    kohya_base_model_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2-768-v/lora"
    hub_models = (
        "stabilityai/stable-diffusion-2-1",
        "stabilityai/stable-diffusion-2-1-base",
        "stabilityai/stable-diffusion-2",
        "stabilityai/stable-diffusion-2-base",
    )
    checkpoint_signatures = ("cond_stage_model.model.",)
    text_width = 1024
    text_encoder_params = 340e6
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        # SD 1.x's tiny UNet with SD 2's differences: head widths, its text width, linear projections.
        "tiny": {
            **StableDiffusion1.denoiser_shapes["tiny"],
            "attention_head_dim": (2, 4),
            "cross_attention_dim": 48,
            "use_linear_projection": True,
        },
        "full": dict(
            sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
        ),
    }
    random_text_encoders = ("openclip-h",)
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {}  # SD 1.x's are not inherited: none of SD 2
    _quick_gelu = False

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        # SD 2's 512 px base predicts noise; only the 768 px models predict velocity.
        return cls.modelspec_architecture if prediction_type == "v_prediction" else "stable-diffusion-v2-512/lora"

    @classmethod
    def _scheduler(cls):
        from diffusers import DDIMScheduler

        # The random model stands for the 768 px models, which predict velocity.
        return DDIMScheduler(
            **cls.noise_schedule, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
        )
