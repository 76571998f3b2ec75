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

Files from elsewhere name the transformer's layers as Black Forest Labs' own code does (`double_blocks.N.img_attn.qkv`),
with q, k and v in one layer and, in the single blocks, the MLP's input beside them (`linear1`): their single-file
checkpoints (the transformer alone, or under `model.diffusion_model.` in an all-in-one file), and the LoRAs of
kohya's sd-scripts and FluxGym (`lora_unet_double_blocks_N_img_attn_qkv`) and ComfyUI (`diffusion_model.`). Both
are read here into diffusers' names with the loaded model's own widths: diffusers' converters assume the full-size
Flux.1's. ai-toolkit's LoRAs keep diffusers' names, under `transformer.` or `diffusion_model.`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import ImageGeometry, Imported
from lora_gui.families.rectified_flow import (
    SWAPPED_HALVES,
    BlackForestLabsNames,
    RectifiedFlowTransformer,
    lora_layers,
    scaled_factors,
    swap_halves,
)

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


# The guidance Flux.1-dev's guidance embedding gets while its LoRA trains, as kohya's and ai-toolkit's
# trainers set it: the distilled guidance is a sampling knob, and training at 1 keeps it free to use.
TRAINING_GUIDANCE = 1.0
# Flux.1-schnell is distilled to make a picture in a few steps, without a guidance input.
SCHNELL_STEPS, SCHNELL_GUIDANCE = 4, 0.0

# Black Forest Labs' name of each transformer layer -> diffusers' layers it holds, stacked along its outputs in this
# order; a block's layers are named within the block. Transcribed from diffusers'
# convert_flux_transformer_checkpoint_to_diffusers (loaders/single_file_utils.py).
_ORIGINAL_LAYERS = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_DOUBLE_BLOCK_LAYERS = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
_SINGLE_BLOCK_LAYERS = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
_NAMES = BlackForestLabsNames(_ORIGINAL_LAYERS, _DOUBLE_BLOCK_LAYERS, _SINGLE_BLOCK_LAYERS)
# Where the transformer's layers are in an all-in-one checkpoint (ComfyUI's), and in LoRAs: diffusers' and
# ai-toolkit's (transformer.), ComfyUI's and ai-toolkit's (diffusion_model.), fal's (base_model.model.), kohya's.
_ALL_IN_ONE_PREFIX = "model.diffusion_model."
_TRANSFORMER_PREFIXES = (
    "transformer.",
    _ALL_IN_ONE_PREFIX,
    "diffusion_model.",
    "base_model.model.",
    "lora_unet_",
    "lora_transformer_",
)
# CLIP's layers in diffusers', kohya's (lora_te1_; lora_te_ in older tools) and ComfyUI's LoRAs; and T5's, which
# diffusers can't put a LoRA on.
_CLIP_PREFIXES = ("text_encoder.", "lora_te1_", "lora_te_", "text_encoders.clip_l.transformer.")
_T5_PREFIXES = ("lora_te3_", "text_encoders.t5xxl.")
# Flux.1-dev's schedule, which Chroma's keeps: shifted by the picture's size when sampling (dynamic shifting).
DYNAMIC_SHIFT_SCHEDULE: dict[str, Any] = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


class Flux1(RectifiedFlowTransformer):
    name = "flux"
    title = "Flux.1"
    short_title = "Flux"
    pipeline_class = Imported("diffusers", "FluxPipeline")
    denoiser_class = Imported("diffusers", "FluxTransformer2DModel")
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
    # Black Forest Labs' names of its layers, and its CLIP's pipeline attribute, which LoRAs from elsewhere may adapt.
    original_names: ClassVar[BlackForestLabsNames] = _NAMES
    clip_name: ClassVar[str | None] = "text_encoder"
    kohya_text_encoder_prefixes = ("lora_te1", "lora_te2")
    kohya_network_module = "networks.lora_flux"
    kohya_base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    hub_models = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
    # Black Forest Labs' own layout: the transformer alone, or inside an all-in-one checkpoint.
    checkpoint_signatures = ("double_blocks.", "model.diffusion_model.double_blocks.", "diffusion_model.double_blocks.")
    text_width = 4096  # T5-XXL's
    lora_signatures = ("transformer.", "lora_transformer_")  # its transformer's layers
    prompt_tokens = 512  # T5's: the transformer attends to them; its CLIP gives only a pooled summary of 77
    text_encoder_params = 123e6 + 4.76e9
    text_encoder_fp32_params = 24 * 4096 * 10240  # T5-XXL's 24 `wo` layers: 1.9 GB more in fp16
    # Streamed: CLIP whole (123 M), T5's embeddings (132 M) and one of its 24 blocks (193 M), of 4.9 B.
    text_encoder_streamed_share = 0.1
    swap_blocks = ("transformer_blocks", "single_transformer_blocks")
    random_text_encoders = ("clip-l", "t5")
    # Flux.1's VAE: 16 latent channels, a shift factor and no quant convolutions.
    random_vae: ClassVar[dict[str, Any]] = dict(
        scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False
    )
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {
        "flux-tiny": ("tiny", 128),
        "flux-shallow": ("shallow", 512),
        "flux": ("full", 1024),
    }
    reference_script = "train_dreambooth_lora_flux.py"
    # Its defaults: the double blocks' attention and MLP layers (ours adds the single blocks' MLP input, proj_mlp).
    reference_targets = default_target_modules[:-1]
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
    pipeline_dtype = "bfloat16"  # what Black Forest Labs trained and publish it in
    # In bf16, the transformer's 12 B parameters and T5-XXL's 4.7 B: more than a 24 GB card holds.
    too_large_for_one_gpu = "The whole of Flux.1 is ~33 GB"

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "FluxPipeline"

    @classmethod
    def variant(cls, pipe: DiffusionPipeline) -> str:
        return "dev" if pipe.transformer.config.guidance_embeds else "schnell"

    @classmethod
    def generation_defaults(cls, pipe: DiffusionPipeline) -> tuple[int, float]:
        if cls.variant(pipe) == "schnell":
            return SCHNELL_STEPS, SCHNELL_GUIDANCE
        return cls.default_steps, cls.default_guidance

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        return f"flux-1-{variant or 'dev'}/lora"

    @classmethod
    def lora_for_diffusers(
        cls, tensors: Mapping[str, torch.Tensor], pipe: DiffusionPipeline
    ) -> dict[str, torch.Tensor] | None:
        """Black Forest Labs' layers (kohya's, FluxGym's, ComfyUI's LoRAs), diffusers' layers under another prefix
        (ai-toolkit's) and kohya's CLIP layers, in diffusers' names: each fused layer's LoRA given to every layer it
        holds (the same down weight, the up weight's rows shared out), alpha / rank folded into the down weight."""
        modules = lora_layers(tensors)
        if modules is None:
            return None  # a layout diffusers converts itself (XLabs', Black Forest Labs' Control LoRAs)
        if all(key.startswith(("transformer.", "text_encoder.")) and "lora_down" not in key for key in tensors):
            return None  # diffusers' own layout, whose metadata diffusers reads from the file
        places = _LayerPlaces(pipe, cls.original_names, cls.clip_name)
        converted: dict[str, torch.Tensor] = {}
        unplaced = []
        for module, parts in modules.items():
            place = places.find(module)
            if place is None or not {"down", "up"} <= parts.keys():
                unplaced.append(module)
                continue
            component, original, targets = place
            down, up = scaled_factors(tensors, parts)
            if original == SWAPPED_HALVES:
                up = swap_halves(up)
            for target, rows in zip(targets, _split_outputs(up, len(targets), places.width, module), strict=True):
                places.check(component, target, down, module)
                converted[f"{component}.{target}.lora_A.weight"] = down
                converted[f"{component}.{target}.lora_B.weight"] = rows.contiguous()
        if any(module.startswith(_T5_PREFIXES) for module in unplaced):
            raise ValueError("it adapts T5 too, which diffusers can't put a LoRA on; it works in ComfyUI and Forge")
        if unplaced:
            raise ValueError(
                f"it adapts layers this {cls.title} model does not have, such as {', '.join(sorted(unplaced)[:3])}"
            )
        return converted

    @classmethod
    def denoiser_from_single_file(
        cls, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Black Forest Labs' transformer, alone or in an all-in-one file, with its widths read from the file
        (diffusers' own converter assumes the full-size model's), its depth and its guidance input (dev has one,
        schnell not)."""
        weights, shape = cls.original_weights(tensors)
        guided = any(key.startswith("time_text_embed.guidance_embedder.") for key in weights)
        return weights, {**shape, "guidance_embeds": guided}

    @classmethod
    def original_weights(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A checkpoint's transformer in Black Forest Labs' names (`original_names`) in diffusers' names, each fused
        layer cut at the file's own width, and its depth."""
        prefix = next((p for p in (_ALL_IN_ONE_PREFIX, "diffusion_model.", "") if f"{p}img_in.weight" in tensors), None)
        if prefix is None:
            raise ValueError(f"it holds no {cls.title} transformer (it has no img_in.weight)")
        width = tensors[f"{prefix}img_in.weight"].shape[0]
        names = cls.original_names
        weights, unknown = names.weights(
            tensors, prefix, lambda value, parts, key: _split_outputs(value, parts, width, key)
        )
        if unknown:
            raise ValueError(
                f"it holds tensors that are not a {cls.title} transformer's, such as {', '.join(sorted(unknown)[:3])}"
            )
        blocks = {
            kind: {key.split(".")[1] for key in weights if key.startswith(f"{name}.")}
            for kind, (name, _) in names.blocks.items()
        }
        return weights, dict(num_layers=len(blocks["double_blocks"]), num_single_layers=len(blocks["single_blocks"]))

    @classmethod
    def single_file_companions(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """FLUX.1-dev for a transformer with a guidance input, FLUX.1-schnell for one without; the VAE and text
        encoders are the same in both, so the other one serves too."""
        dev, schnell = cls.hub_models
        guided = any("guidance_in." in key for key in tensors)
        return (dev, schnell) if guided else (schnell, dev)

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
    def predict(
        cls,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        geometry: list[ImageGeometry],
    ) -> torch.Tensor:
        import torch

        batch, _, height, width = noisy.shape
        text = conditioning["prompt_embeds"]
        config = getattr(denoiser, "module", denoiser).config  # several processes wrap it
        guidance = torch.full((batch,), TRAINING_GUIDANCE, device=noisy.device) if config.guidance_embeds else None
        tokens, ids = cls.image_tokens(noisy, conditioning)
        prediction = denoiser(
            hidden_states=tokens,
            timestep=timesteps / 1000,  # the transformer scales it back to the schedule's timesteps
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=ids,
            return_dict=False,
        )[0]
        # The noisy latents' own patches (an editing model's reference patches follow them), unpacked as the pipeline
        # does for pictures of the latents' own size (a VAE factor of 1).
        patches = (height // 2) * (width // 2)
        return cls.pipeline_class._unpack_latents(prediction[:, :patches], height, width, 1)

    @classmethod
    def image_tokens(
        cls, noisy: torch.Tensor, conditioning: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's picture sequence: the latents in 2x2 patches ("packed"), and each patch's position id."""
        batch, channels, height, width = noisy.shape
        pipeline_class = cls.pipeline_class
        return (
            pipeline_class._pack_latents(noisy, batch, channels, height, width),
            pipeline_class._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype),
        )

    @classmethod
    def prompt_options(cls, pipe: DiffusionPipeline) -> dict[str, Any]:
        """T5's length: training pads captions to its tokenizer's length (512 for Flux.1), and the pipeline pads to 512
        unless told; T5 and the transformer read the padding, so a model trained at another length (the tests' demo
        Flux reads 32 tokens) must be sampled at that length."""
        return {"max_sequence_length": pipe.tokenizer_2.model_max_length}

    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1, **cls.prompt_options(pipe)
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @classmethod
    def latents_for_vae(cls, pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        unpacked = cls.pipeline_class._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        return super().latents_for_vae(pipe, unpacked, height, width)

    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        import torch

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
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler

        (clip_tokenizer, t5_tokenizer), (clip, t5) = tokenizers, text_encoders
        return cls.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler(**DYNAMIC_SHIFT_SCHEDULE),
            vae=vae,
            text_encoder=clip,
            tokenizer=clip_tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=cls.build_denoiser(size),
        )


def _split_outputs(weight: torch.Tensor, parts: int, width: int, name: str) -> list[torch.Tensor]:
    """A fused layer's weight, bias or LoRA up weight cut into the layers it holds: q, k and v are `width` outputs
    each, and a single block's MLP input after them takes the rest."""
    import torch

    rest = weight.shape[0] - width * (parts - 1)
    if rest <= 0 or (parts == 3 and rest != width):
        raise ValueError(
            f"{name} has {weight.shape[0]} outputs, which don't divide into this model's layers of {width}: "
            "it was made for a Flux model of another size"
        )
    return list(torch.split(weight, [width] * (parts - 1) + [rest]))


class _LayerPlaces:
    """Where a LoRA file's layer goes in a loaded Flux pipeline, whatever the tool that wrote it named it."""

    def __init__(self, pipe: DiffusionPipeline, names: BlackForestLabsNames, clip_name: str | None):
        self.original_names = names
        config = pipe.transformer.config
        self.width = config.num_attention_heads * config.attention_head_dim
        # Each component's layers by diffusers' dotted name, and that name by itself and by kohya's "_" spelling.
        # CLIP's are the canonical names (text_model.encoder...), which transformers 5 no longer has as a level.
        self.layers: dict[str, dict[str, torch.nn.Module]] = {}
        self.names: dict[str, dict[str, str]] = {}
        components = {"transformer": pipe.transformer, "text_encoder": getattr(pipe, clip_name) if clip_name else None}
        for component, model in ((component, model) for component, model in components.items() if model is not None):
            layers = {
                (
                    f"text_model.{name}" if component == "text_encoder" and not name.startswith("text_model") else name
                ): layer
                for name, layer in model.named_modules()
                if hasattr(layer, "in_features")
            }
            self.layers[component] = layers
            self.names[component] = {spelling: name for name in layers for spelling in (name, name.replace(".", "_"))}

    def find(self, module: str) -> tuple[str, str, tuple[str, ...]] | None:
        """(component, Black Forest Labs' name or "", diffusers' layers) for a module name in a LoRA file."""
        for component, prefixes in (("transformer", _TRANSFORMER_PREFIXES), ("text_encoder", _CLIP_PREFIXES)):
            name = next((module[len(prefix) :] for prefix in prefixes if module.startswith(prefix)), None)
            if name is None or component not in self.names:
                continue
            original = self.original_names.find(name) if component == "transformer" else None
            if original is not None:
                return component, *original
            if name in self.names[component]:
                return component, "", (self.names[component][name],)
        return None

    def check(self, component: str, target: str, down: torch.Tensor, module: str) -> None:
        """That the model has this layer, as wide as the LoRA's down weight reads."""
        layer = self.layers[component].get(target)
        if layer is None:
            raise ValueError(
                f"{module} adapts {target}, which this model does not have: it was made for a deeper model"
            )
        if down.shape[-1] != layer.in_features:
            raise ValueError(
                f"{module} reads {down.shape[-1]} inputs where this model's {target} has {layer.in_features}: "
                "it was made for a model of another size"
            )
