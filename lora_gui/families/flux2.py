"""Flux.2 klein (4B and 9B, base and distilled): a rectified-flow transformer reading a Qwen3 language model.

One text encoder: Qwen3 (4B for klein 4B, 8B for klein 9B) reads each caption wrapped in its chat template, and the
transformer attends to its hidden states after layers 9, 18 and 27 side by side, all 512 tokens padding included (the
attention mask reaches only Qwen3). Qwen3 is frozen; it encodes the captions and preview prompts once, then leaves the
GPU. The VAE's 32 latent channels reach the transformer as 2x2 patches of 128 channels, normalized by the VAE's
batch-norm running statistics (not a shift and scale), packed into a sequence with 4-axis position ids. There is no
guidance input: the distilled models make a picture in 4 steps without guidance, the base models in about 50 with
classifier-free guidance against the empty prompt. It learns the velocity from the picture to the noise
(objectives.FlowMatching, unchanged), as diffusers' train_dreambooth_lora_flux2_klein.py trains it. A run asked to
train on a distilled model trains on its base (`distilled_bases`): the LoRA works on both.

The file for ComfyUI keeps diffusers' `transformer.` names, as Flux.1's does, each layer's alpha / rank folded into its
up weight (diffusers' Flux.2 loader refuses alpha tensors; ComfyUI reads a layer without one at scale 1): ComfyUI's
Flux.2 is a Flux model, so comfy/lora.py maps `transformer.<name>` through comfy.utils.flux_to_diffusers, which has
every layer the LoRA trains by default (its "# Flux 2" lines: the single blocks' fused to_qkv_mlp_proj and to_out).
The modulation layers shared by all blocks have no such name there, so they are not trained by default.

Files from elsewhere name the layers as Black Forest Labs' code does (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`): their single-file checkpoints, and the LoRAs of musubi-tuner and kohya
(`lora_unet_...`, lora_down / lora_up / alpha), ai-toolkit (`diffusion_model.` with lora_A / lora_B) and ComfyUI
(`diffusion_model.`, either suffix, with alphas); ComfyUI and SimpleTuner also write diffusers' names with alphas. All
are read here into diffusers' names, alpha / rank folded in: diffusers' own converters refuse alphas beside
`diffusion_model.` names and `transformer.` names, and the modulation layers in kohya's names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import ImageGeometry, Imported
from lora_gui.families.flux import TRAINING_GUIDANCE
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
    from PIL import Image


# The published models: each distilled one and the base it was distilled from, 4B and 9B.
KLEIN_4B, KLEIN_BASE_4B = "black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B"
KLEIN_9B, KLEIN_BASE_9B = "black-forest-labs/FLUX.2-klein-9B", "black-forest-labs/FLUX.2-klein-base-9B"
# What each makes its pictures with (diffusers' pipeline docs and examples): the distilled ones in 4 steps without
# guidance, the base ones in 50 with classifier-free guidance 4.
DISTILLED_STEPS, DISTILLED_GUIDANCE = 4, 1.0
# The Qwen3 hidden states the transformer reads (the pipeline's default; hidden_states[0] is the embeddings').
TEXT_LAYERS = (9, 18, 27)
# The tiny model's token length: its transformer attends to all of them, padding included.
TINY_PROMPT_TOKENS = 48
# Qwen3-4B's and Qwen3-8B's parameters, klein 4B's and 9B's text encoders.
QWEN3_4B_PARAMS, QWEN3_8B_PARAMS = 4.02e9, 8.19e9

# Black Forest Labs' name of each transformer layer -> diffusers' layers it holds, stacked along its outputs in this
# order; a block's layers are named within the block. Transcribed from diffusers'
# convert_flux2_transformer_checkpoint_to_diffusers (loaders/single_file_utils.py).
_ORIGINAL_LAYERS = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_DOUBLE_BLOCK_LAYERS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
_SINGLE_BLOCK_LAYERS = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
_NAMES = BlackForestLabsNames(_ORIGINAL_LAYERS, _DOUBLE_BLOCK_LAYERS, _SINGLE_BLOCK_LAYERS)
# Where the transformer is in an all-in-one or ComfyUI checkpoint, and its layers in LoRAs: diffusers' and
# SimpleTuner's (transformer.), ai-toolkit's and ComfyUI's (diffusion_model.), fal's (base_model.model.), kohya's and
# musubi-tuner's (lora_unet_), OneTrainer's (lora_transformer_).
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_LORA_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "lora_unet_", "lora_transformer_")
# The most single blocks a klein transformer has (9B's 24): peft names layers by suffix, and `attn.to_out` alone would
# also name the double blocks' list of output layers, so the single blocks' are named one by one.
_MOST_SINGLE_BLOCKS = 24


def _published_shape(double: int, single: int, heads: int, text_width: int) -> dict[str, Any]:
    """A published klein transformer's constructor arguments (diffusers' convert_flux2_to_diffusers.py): its blocks,
    its heads of 128 and the width of Qwen3's three hidden states; no guidance input."""
    return dict(
        num_layers=double,
        num_single_layers=single,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        in_channels=128,
        attention_head_dim=128,
        guidance_embeds=False,
    )


class Flux2Klein(RectifiedFlowTransformer):
    name = "flux2-klein"
    title = "Flux.2 klein"
    short_title = "Flux.2 klein"
    pipeline_class = Imported("diffusers", "Flux2KleinPipeline")
    denoiser_class = Imported("diffusers", "Flux2Transformer2DModel")
    # Every linear layer of the blocks: the double blocks' attention and MLPs, the single blocks' fused input
    # (q, k, v and the MLP's) and output. The modulation shared by all blocks stays frozen (see above).
    default_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
        *(f"single_transformer_blocks.{index}.attn.to_out" for index in range(_MOST_SINGLE_BLOCKS)),
    )
    tokenizer_names = ("tokenizer",)
    kohya_alpha_folded = True  # diffusers' Flux.2 loader refuses alpha tensors; ComfyUI reads none as scale 1
    kohya_file_loads_in = "ComfyUI"  # neither AUTOMATIC1111 nor Forge runs this family
    kohya_network_module = "networks.lora_flux_2"
    kohya_base_model_version = "flux2_klein"
    modelspec_architecture = "Flux.2-klein-4b/lora"  # musubi-tuner's names (utils/sai_model_spec.py)
    hub_models = (KLEIN_BASE_4B, KLEIN_4B, KLEIN_BASE_9B, KLEIN_9B)
    distilled_bases: ClassVar[dict[str, str]] = {KLEIN_4B: KLEIN_BASE_4B, KLEIN_9B: KLEIN_BASE_9B}
    # Black Forest Labs' own layout, whose modulation shared by all blocks Flux.1 doesn't have.
    checkpoint_signatures = tuple(f"{prefix}single_stream_modulation.lin." for prefix in _CHECKPOINT_PREFIXES)
    text_width = 3 * 2560  # Qwen3-4B's three hidden states, klein 4B's
    lora_signatures = tuple(
        f"{prefix}{layer}"
        for prefix in ("transformer.", "diffusion_model.", "lora_unet_")
        for layer in ("single_transformer_blocks.0.attn.to_qkv_mlp_proj", "double_stream_modulation", "single_stream")
    )
    prompt_tokens = 512  # the chat template's tokens included, as the pipeline counts them
    tiny_prompt_tokens = TINY_PROMPT_TOKENS
    # The text encoder's hidden states the transformer reads, and the published text encoder's depth.
    text_layers: ClassVar[tuple[int, ...]] = TEXT_LAYERS
    text_encoder_depth = 36
    text_encoder_params = QWEN3_4B_PARAMS
    # Qwen3-4B streamed: its embeddings (389 M) and one of its 36 layers (101 M); Qwen3-8B's share is 0.10.
    text_encoder_streamed_share = 0.13
    # klein 4B's 5 double-stream blocks of 245 M parameters, 20 single-stream of 123 M (9B: 8 of 436 M, 24 of 218 M).
    swap_blocks = ("transformer_blocks", "single_transformer_blocks")
    vae_params = 84e6
    random_text_encoders = ("qwen3-4b",)
    random_vae: ClassVar[dict[str, Any]] = dict(vae_class="AutoencoderKLFlux2", latent_channels=32)
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {
        "flux2-klein-tiny": ("tiny", 128),
        "flux2-klein-shallow": ("shallow", 512),
        "flux2-klein": ("full", 1024),
    }
    reference_script = "train_dreambooth_lora_flux2_klein.py"
    # Its defaults: the double blocks' q, k, v and output, and the single blocks' fused input and output.
    reference_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", *default_target_modules[13:])
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            num_layers=1,
            num_single_layers=1,
            in_channels=128,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * 32,  # tiny.py's Qwen3 is 32 wide
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        ),
        # klein 4B's width with one of its 5 double blocks and 4 of its 20 single ones: a fifth a CPU holds.
        "shallow": _published_shape(double=1, single=4, heads=24, text_width=7680),
        "full": _published_shape(double=5, single=20, heads=24, text_width=7680),
        "full-9b": _published_shape(double=8, single=24, heads=32, text_width=12288),
    }
    default_steps = 50
    default_guidance = 4.0
    negative_prompt = False  # the pipeline guides against the empty prompt and takes no other
    pipeline_dtype = "bfloat16"  # what Black Forest Labs publish it in
    # In bf16, klein 4B's transformer and Qwen3-4B are 16 GB, klein 9B's and Qwen3-8B 35 GB: more than a common card.
    too_large_for_one_gpu = "The whole of Flux.2 klein is 16 GB (4B) to 35 GB (9B)"
    # The same weights make pictures from text and edit up to 4 reference pictures (Black Forest Labs' editing guide,
    # docs.bfl.ai): a LoRA trains on pictures alone, or on edit pairs.
    reference_images = 4
    trains_without_pairs = True

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "Flux2KleinPipeline"

    @classmethod
    def variant(cls, pipe: DiffusionPipeline) -> str:
        return "9b" if pipe.transformer.config.joint_attention_dim == 3 * 4096 else "4b"

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        return f"Flux.2-klein-{variant or '4b'}/lora"

    @classmethod
    def estimate_model(cls, base_model: str, parameters_on_disk: int | None) -> tuple[str, float]:
        """klein 9B (named so, or with a 9B transformer on disk) and its Qwen3-8B; else klein 4B and its Qwen3-4B."""
        nine = "9b" in base_model.lower() or (parameters_on_disk or 0) > 6e9
        return ("full-9b", QWEN3_8B_PARAMS) if nine else ("full", QWEN3_4B_PARAMS)

    @classmethod
    def generation_defaults(cls, pipe: DiffusionPipeline) -> tuple[int, float]:
        if pipe.config.get("is_distilled"):
            return DISTILLED_STEPS, DISTILLED_GUIDANCE
        return cls.default_steps, cls.default_guidance

    # ---- the parts and conditioning -------------------------------------------------------------
    @classmethod
    def cross_attention_width(cls, pipe: DiffusionPipeline) -> int:
        return pipe.transformer.config.joint_attention_dim

    @classmethod
    def tokenize(cls, pipe: DiffusionPipeline, captions: list[str]) -> list[torch.Tensor]:
        """Each caption in Qwen3's chat template, padded to the tokenizer's length as the pipeline does: the token
        ids, and the attention mask Qwen3 reads them with."""
        tokenizer = pipe.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": caption}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for caption in captions
        ]
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=cls.prompt_length(pipe),
            truncation=True,
            return_tensors="pt",
        )
        return [tokens.input_ids, tokens.attention_mask]

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        import torch

        (qwen,), (ids, mask) = encoders, token_ids
        # The language model without its head: the pipeline's hidden states, without logits over 152k words.
        model = getattr(qwen, "model", qwen)
        hidden = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False
        ).hidden_states
        stacked = torch.stack([hidden[layer] for layer in cls.read_layers(len(hidden) - 1)], dim=2)  # (B, L, 3, H)
        return {"prompt_embeds": stacked.flatten(2)}

    # ---- training -------------------------------------------------------------------------------
    @classmethod
    def latents_for_denoiser(cls, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """2x2 patches of the VAE's latents (B, 128, h/2, w/2), normalized by its batch norm's running statistics,
        as the pipeline encodes an image."""

        patches = cls.pipeline_class._patchify_latents(latents)
        mean, std = batch_norm_statistics(vae, patches)
        return (patches - mean) / std

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

        pipeline_class = cls.pipeline_class
        batch, _, height, width = noisy.shape
        text = conditioning["prompt_embeds"]
        tokens, image_ids = pipeline_class._pack_latents(noisy), pipeline_class._prepare_latent_ids(noisy)
        # klein has no guidance input; dev's gets Flux.1-dev's training guidance (flux.TRAINING_GUIDANCE).
        config = getattr(denoiser, "module", denoiser).config  # several processes wrap it
        guidance = torch.full((batch,), TRAINING_GUIDANCE, device=noisy.device) if config.guidance_embeds else None
        prediction = denoiser(
            **cls.with_reference(tokens, image_ids.to(noisy.device), conditioning.get("reference_latents")),
            timestep=timesteps / 1000,  # the transformer scales it back to the schedule's timesteps
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=pipeline_class._prepare_text_ids(text).to(noisy.device),
            return_dict=False,
        )[0]
        # The noisy latents' own patches (an edit's reference patches follow them); klein's pipeline's unpacking is told
        # the size, where Flux2Pipeline's reads it off the ids (a GPU sync).
        prediction = prediction[:, : tokens.shape[1]]
        return Flux2Klein.pipeline_class._unpack_latents_with_ids(prediction, image_ids.to(noisy.device), height, width)

    @classmethod
    def with_reference(
        cls, tokens: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The transformer's picture sequence and position ids, with an edit pair's "before" picture (latents as the
        noisy ones, or None) after the noisy patches, as the pipeline joins a reference picture: its first coordinate
        10 (Flux2KleinPipeline._prepare_image_ids)."""
        import torch

        if reference is None:
            return {"hidden_states": tokens, "img_ids": ids}
        pipeline_class = cls.pipeline_class
        reference_ids = pipeline_class._prepare_image_ids([reference[:1]]).to(ids).expand(len(tokens), -1, -1)
        return {
            "hidden_states": torch.cat([tokens, pipeline_class._pack_latents(reference.to(tokens.dtype))], dim=1),
            "img_ids": torch.cat([ids, reference_ids], dim=1),
        }

    @classmethod
    def reference_options(
        cls, pipe: DiffusionPipeline, images: list[Image.Image], width: int, height: int
    ) -> dict[str, Any]:
        """Its reference pictures, each already fitted to the picture to make (the pipeline keeps a picture of 1 MP or
        less as it is)."""
        return {"image": images} if images else {}

    # ---- previews and Generate ------------------------------------------------------------------
    @classmethod
    def prompt_options(cls, pipe: DiffusionPipeline) -> dict[str, Any]:
        """The tokenizer's length, which training pads captions to: Qwen3 and the transformer read the padding, so a
        model trained at another length (the tiny one reads 48 tokens) must be sampled at that length; and the Qwen3
        layers training reads (the pipeline's 9, 18 and 27, or a benchmark's shallow Qwen3's)."""
        return {
            "max_sequence_length": cls.prompt_length(pipe),
            "text_encoder_out_layers": cls.read_layers(pipe.text_encoder.config.get_text_config().num_hidden_layers),
        }

    @classmethod
    def prompt_length(cls, pipe: DiffusionPipeline) -> int:
        """The tokens a caption is padded to: the pipeline's 512, or the tokenizer's length where that is shorter (the
        tiny models'); the published tokenizers' own lengths are far longer than the pipeline reads."""
        tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # a processor holds its tokenizer
        return min(tokenizer.model_max_length, cls.prompt_tokens)

    @classmethod
    def read_layers(cls, depth: int) -> tuple[int, ...]:
        """The text encoder's hidden states the transformer reads, from a text encoder of this many layers: the
        published one's (`text_layers`), and a benchmark's shallow one (a few of its layers, tiny.py) at the same
        fractions of its depth."""
        layers = cls.text_layers
        return layers if depth >= max(layers) else tuple(layer * depth // cls.text_encoder_depth for layer in layers)

    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The prompt's embeddings and, for a base model (which guides), the empty prompt's: the pipeline would
        otherwise encode it with Qwen3, which has left the GPU."""
        options = cls.prompt_options(pipe)
        embeddings = {"prompt_embeds": pipe.encode_prompt(prompt=prompt, device=device, **options)[0]}
        if not pipe.config.get("is_distilled"):
            embeddings["negative_prompt_embeds"] = pipe.encode_prompt(prompt="", device=device, **options)[0]
        return embeddings

    @classmethod
    def latents_for_vae(cls, pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents  # the pipeline returns them unpatchified and unnormalized already

    # ---- files made elsewhere -------------------------------------------------------------------
    @classmethod
    def lora_for_diffusers(
        cls, tensors: Mapping[str, torch.Tensor], pipe: DiffusionPipeline
    ) -> dict[str, torch.Tensor] | None:
        """Any layout above in diffusers' names: a fused layer's LoRA given to each layer it holds (the same down
        weight, the up weight's rows shared out), alpha / rank folded into the down weight."""
        modules = lora_layers(tensors)
        if modules is None:
            return None  # a layout diffusers converts itself (LoKr)
        if all(key.startswith("transformer.") and not key.endswith((".alpha", "lora_down.weight")) for key in tensors):
            return None  # diffusers' own layout, whose metadata diffusers reads from the file
        transformer = pipe.transformer
        layers = _layer_names(transformer)
        converted: dict[str, torch.Tensor] = {}
        for module, parts in modules.items():
            name = next((module[len(p) :] for p in _LORA_PREFIXES if module.startswith(p)), None)
            place = None if name is None else _NAMES.find(name) or layers.get(name)
            if place is None or not {"down", "up"} <= parts.keys():
                raise ValueError(f"it adapts layers this {cls.title} model does not have, such as {module}")
            original, targets = place
            down, up = scaled_factors(tensors, parts)
            if original == SWAPPED_HALVES:
                up = swap_halves(up)
            for target, rows in zip(targets, up.chunk(len(targets)), strict=True):
                _check_fits(transformer, target, down, rows, module)
                converted[f"transformer.{target}.lora_A.weight"] = down
                converted[f"transformer.{target}.lora_B.weight"] = rows.contiguous()
        return converted

    @classmethod
    def single_file_companions(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """The published klein of the transformer's width; the base model first (what a LoRA trains on, and its
        guided sampling serves a distilled transformer too, only slower), its VAE and text encoder being the same."""
        prefix = _checkpoint_prefix(tensors)
        wide = prefix is not None and tensors[f"{prefix}img_in.weight"].shape[0] == 4096
        return (KLEIN_BASE_9B, KLEIN_9B) if wide else (KLEIN_BASE_4B, KLEIN_4B)

    @classmethod
    def denoiser_from_single_file(
        cls, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Black Forest Labs' transformer, alone or in an all-in-one file, with its shape read from the file: diffusers
        reads klein's files as FLUX.2-dev's 32B shape."""
        prefix = _checkpoint_prefix(tensors)
        if prefix is None:
            raise ValueError(f"it holds no {cls.title} transformer (it has no img_in.weight)")
        # Only q, k and v are fused here (the single blocks' fused input is one diffusers layer too): equal thirds.
        weights, unknown = _NAMES.weights(tensors, prefix, lambda value, parts, key: list(value.chunk(parts)))
        if unknown:
            raise ValueError(
                f"it holds tensors that are not a {cls.title} transformer's, such as {', '.join(sorted(unknown)[:3])}"
            )
        width, in_channels = weights["x_embedder.weight"].shape
        head_width = weights["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        blocks = {
            name: {key.split(".")[1] for key in weights if key.startswith(f"{name}.")}
            for name, _ in _NAMES.blocks.values()
        }
        shape = dict(
            num_layers=len(blocks["transformer_blocks"]),
            num_single_layers=len(blocks["single_transformer_blocks"]),
            in_channels=in_channels,
            attention_head_dim=head_width,
            num_attention_heads=width // head_width,
            joint_attention_dim=weights["context_embedder.weight"].shape[1],
            timestep_guidance_channels=weights["time_guidance_embed.timestep_embedder.linear_1.weight"].shape[1],
            mlp_ratio=weights["transformer_blocks.0.ff.linear_out.weight"].shape[1] / width,
            guidance_embeds=any(key.startswith("time_guidance_embed.guidance_embedder.") for key in weights),
        )
        return weights, shape

    # ---- the estimate and random-weight models --------------------------------------------------
    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype, size: str = "full") -> dict[str, Any]:
        import torch

        patches, tokens = (resolution // 16) ** 2, cls.prompt_tokens
        shape = cls.denoiser_shapes[size]
        text_width = shape["joint_attention_dim"]
        return dict(
            hidden_states=torch.empty(1, patches, 128, device="meta", dtype=dtype),
            encoder_hidden_states=torch.empty(1, tokens, text_width, device="meta", dtype=dtype),
            timestep=torch.zeros(1, device="meta", dtype=dtype),
            img_ids=torch.zeros(1, patches, 4, device="meta", dtype=torch.long),
            txt_ids=torch.zeros(1, tokens, 4, device="meta", dtype=torch.long),
            guidance=torch.ones(1, device="meta", dtype=dtype) if shape["guidance_embeds"] else None,
        )

    @classmethod
    def checkpointed_blocks(cls) -> tuple[type[torch.nn.Module], ...]:
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2SingleTransformerBlock,
            Flux2TransformerBlock,
        )

        return (Flux2TransformerBlock, Flux2SingleTransformerBlock)

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        return cls.pipeline_class(**cls.random_components(size, tokenizers, text_encoders, vae), is_distilled=False)

    @classmethod
    def random_components(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> dict[str, Any]:
        """The random pipeline's parts by name, the transformer made here."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        (tokenizer,), (text_encoder,) = tokenizers, text_encoders
        if size == "tiny":
            tokenizer.model_max_length = cls.tiny_prompt_tokens
        # Running statistics far from 0 and 1, so a picture comes out right only if they are applied both ways.
        with torch.no_grad():
            vae.bn.running_mean.uniform_(-0.5, 0.5)
            vae.bn.running_var.uniform_(0.25, 4.0)
        # klein's schedule: shifted by the picture's size when sampling (dynamic shifting).
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        return dict(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=cls.build_denoiser(size),
        )


def batch_norm_statistics(vae: torch.nn.Module, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of the VAE's batch norm, which the pipelines normalize latent patches by, as
    the patches' dtype and device."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches)
    return mean, std


def _checkpoint_prefix(tensors: Mapping[str, torch.Tensor]) -> str | None:
    return next((p for p in _CHECKPOINT_PREFIXES if f"{p}img_in.weight" in tensors), None)


def _layer_names(transformer: torch.nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The loaded transformer's linear layers by diffusers' names, dotted and in kohya's "_" spelling, each as
    `BlackForestLabsNames.find` gives a layer: ("", (its dotted name,))."""
    return {
        spelling: ("", (layer,))
        for layer, module in transformer.named_modules()
        if hasattr(module, "in_features")
        for spelling in (layer, layer.replace(".", "_"))
    }


def _check_fits(transformer: torch.nn.Module, target: str, down: torch.Tensor, up: torch.Tensor, module: str) -> None:
    """That the loaded transformer has this layer, as wide as the LoRA reads and writes."""
    try:
        layer = transformer.get_submodule(target)
    except AttributeError:
        raise ValueError(
            f"{module} adapts {target}, which this model does not have: it was made for a deeper model"
        ) from None
    if (down.shape[-1], up.shape[0]) != (layer.in_features, layer.out_features):
        raise ValueError(
            f"{module} reads {down.shape[-1]} inputs and writes {up.shape[0]} outputs where this model's {target} "
            f"has {layer.in_features} and {layer.out_features}: it was made for a model of another size"
        )
