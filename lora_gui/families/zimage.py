"""Z-Image (Tongyi-MAI's base model and its distilled Turbo): a single-stream rectified-flow transformer.

One text encoder, Qwen3-4B, read as diffusers' pipeline reads it: each caption in Qwen's chat template, padded to
512 tokens, and the second-to-last hidden state of its real tokens (4 B parameters: it encodes the captions and
preview prompts once, then leaves the GPU). Flux.1's VAE (16 channels, shifted and scaled). The transformer takes
lists, one entry a picture: latents as (C, 1, H, W), caption features of each caption's own length, and the time as
1 - sigma (1 = clean); it predicts the velocity from the noise to the picture. `predict` turns that into the house's
terms (the velocity from the picture to the noise, objectives.FlowMatching), as diffusers' Z-Image LoRA script does
(examples/dreambooth/train_dreambooth_lora_z_image.py negates the output against the target noise - latents).

Turbo is distilled to make a picture in 8 steps without guidance; training on it undoes that, so a run asked to train
on it trains on the base model (`distilled_bases`), whose LoRAs work on Turbo too. The two differ in their files only
by their scheduler's shift (Turbo 3, the base 6).

The file for ComfyUI keeps diffusers' `transformer.` names, as Flux.1's does, with each layer's alpha / rank folded
into its up weight (`kohya_alpha_folded`: diffusers' Z-Image loader turns a `transformer.` file with alphas into
`transformer.transformer.` names; ComfyUI reads a layer without alpha at scale 1). ComfyUI runs Z-Image as its
Lumina2 model in the original names (fused `attention.qkv`, `attention.out`, `x_embedder`...), and its comfy/lora.py
(model_lora_keys_unet, `if isinstance(model, comfy.model_base.Lumina2)`) maps "transformer." + every diffusers name
that comfy/utils.py's z_image_to_diffusers lists onto those layers (q, k and v onto their slices of qkv).
tests/test_formats.py checks every key we write against a transcription of that map.

Files from elsewhere: single-file checkpoints in the original names (Comfy-Org's z_image_turbo_bf16.safetensors, the
transformer alone, or under `model.diffusion_model.`), read by diffusers' own converter, which splits qkv whatever
the width; and LoRAs in diffusers' names under `diffusion_model.` (ai-toolkit), in kohya's `lora_unet_` spelling of
diffusers' names (musubi-tuner) or of the original ones with qkv fused (musubi's ComfyUI conversion), and in the
original names under `diffusion_model.` (ComfyUI). diffusers' converter (_convert_non_diffusers_z_image_lora_to_
diffusers) reads some of these but leaves a fused qkv under lora_down/lora_up unsplit and doubles the prefix of a
`transformer.` file with alphas (Flux-style files), so they are all read here, by the loaded model's own names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import ImageGeometry, Imported
from lora_gui.families.rectified_flow import RectifiedFlowTransformer, lora_layers, scaled_factors

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


TURBO_SHIFT = 3.0  # Turbo's scheduler shift; the base model's is 6
# Turbo: 8 steps without guidance (its model card, diffusers' pipeline docstring).
TURBO_STEPS, TURBO_GUIDANCE = 8, 0.0
# The original names of the transformer's layers that diffusers names otherwise: top-level ones, and a block's
# (layers.N, noise_refiner.N, context_refiner.N), q, k and v fused in one. From diffusers'
# convert_z_image_transformer_checkpoint_to_diffusers and ComfyUI's z_image_to_diffusers.
_ORIGINAL_TOP = {
    "x_embedder": ("all_x_embedder.2-1",),
    "final_layer.linear": ("all_final_layer.2-1.linear",),
    "final_layer.adaLN_modulation.1": ("all_final_layer.2-1.adaLN_modulation.1",),
}
_ORIGINAL_IN_BLOCK = {
    "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "attention.out": ("attention.to_out.0",),
}
_BLOCKS = ("layers", "noise_refiner", "context_refiner")
# Where the transformer's layers are: in LoRAs, diffusers' (transformer.), ComfyUI's and ai-toolkit's
# (diffusion_model.), kohya's and musubi-tuner's (lora_unet_); in an all-in-one checkpoint, model.diffusion_model.
_ALL_IN_ONE_PREFIX = "model.diffusion_model."
_LORA_PREFIXES = ("transformer.", _ALL_IN_ONE_PREFIX, "diffusion_model.", "lora_unet_")


class ZImage(RectifiedFlowTransformer):
    name = "zimage"
    title = "Z-Image"
    short_title = "Z-Image"
    pipeline_class = Imported("diffusers", "ZImagePipeline")
    denoiser_class = Imported("diffusers", "ZImageTransformer2DModel")
    # Every block's attention (diffusers' script's set) and its SwiGLU MLP (as musubi-tuner and ai-toolkit train).
    default_target_modules = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )
    kohya_alpha_folded = True
    kohya_file_loads_in = "ComfyUI"  # neither AUTOMATIC1111 nor Forge runs this family
    kohya_network_module = "networks.lora_zimage"  # musubi-tuner's
    kohya_base_model_version = "z_image"  # musubi-tuner's (ai-toolkit writes "zimage")
    modelspec_architecture = "Z-Image/lora"  # musubi-tuner's
    hub_models = ("Tongyi-MAI/Z-Image", "Tongyi-MAI/Z-Image-Turbo")
    distilled_bases: ClassVar[dict[str, str]] = {"Tongyi-MAI/Z-Image-Turbo": "Tongyi-MAI/Z-Image"}
    # The original layout (the caption embedder is named so only here), alone or in an all-in-one file.
    checkpoint_signatures = ("cap_embedder.", _ALL_IN_ONE_PREFIX + "cap_embedder.", "diffusion_model.cap_embedder.")
    text_width = 2560  # Qwen3-4B's
    # Its blocks' names, in every layout its LoRAs come in.
    lora_signatures = tuple(
        f"{prefix}{block}{'_' if prefix == 'lora_unet_' else '.'}"
        for prefix in ("transformer.", "diffusion_model.", "lora_unet_")
        for block in _BLOCKS
    )
    prompt_tokens = 512  # the pipeline's max_sequence_length, the chat template's tokens included
    text_encoder_params = 4.02e9  # Qwen3-4B
    text_encoder_streamed_share = 0.13  # Qwen3-4B streamed: its embeddings (389 M) and one of its 36 layers (101 M)
    swap_blocks = ("noise_refiner", "context_refiner", "layers")  # 2 + 2 + 30 blocks of 177-181 M parameters
    random_text_encoders = ("qwen3-4b",)
    # Flux.1's VAE: 16 latent channels, a shift factor and no quant convolutions.
    random_vae: ClassVar[dict[str, Any]] = dict(
        scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False
    )
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {
        "zimage-tiny": ("tiny", 128),
        "zimage-shallow": ("shallow", 512),
        "zimage": ("full", 1024),
    }
    reference_script = "train_dreambooth_lora_z_image.py"
    reference_targets = ("to_k", "to_q", "to_v", "to_out.0")  # its defaults: every block's attention
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            dim=48,  # its MLP's width, 8/3 of it, is then 128: fp16's int8 groups divide every layer's inputs
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=32,  # the tiny Qwen3's width
            axes_dims=[8, 8, 8],
            axes_lens=[1536, 512, 512],
        ),
        # The full width with two of its 30 layers and one refiner of each kind: a slice a CPU holds, whose speed
        # scales to the whole model's block by block.
        "shallow": dict(n_layers=2, n_refiner_layers=1, axes_lens=[1536, 512, 512]),
        # The published config: diffusers' defaults but for the RoPE's first axis.
        "full": dict(axes_lens=[1536, 512, 512]),
    }
    # The base model's card: 28 to 50 steps at guidance 3 to 5 (ai-toolkit previews it at 30 and 4).
    default_steps = 30
    default_guidance = 4.0
    negative_prompt = True
    pipeline_dtype = "bfloat16"

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "ZImagePipeline"

    @classmethod
    def variant(cls, pipe: DiffusionPipeline) -> str:
        return "turbo" if pipe.scheduler.config.get("shift") == TURBO_SHIFT else ""

    @classmethod
    def generation_defaults(cls, pipe: DiffusionPipeline) -> tuple[int, float]:
        if cls.variant(pipe) == "turbo":
            return TURBO_STEPS, TURBO_GUIDANCE
        return cls.default_steps, cls.default_guidance

    @classmethod
    def cross_attention_width(cls, pipe: DiffusionPipeline) -> int:
        return pipe.transformer.config.cap_feat_dim

    # ---- conditioning ---------------------------------------------------------------------------
    @classmethod
    def tokenize(cls, pipe: DiffusionPipeline, captions: list[str]) -> list[torch.Tensor]:
        """Each caption in Qwen's chat template, as the pipeline sends it: the token ids and which are real."""
        tokenizer = pipe.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for caption in captions
        ]
        tokens = tokenizer(
            texts, padding="max_length", max_length=cls.prompt_tokens, truncation=True, return_tensors="pt"
        )
        return [tokens.input_ids, tokens.attention_mask]

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Qwen3's second-to-last hidden state, padded to the full length, with the mask of the real tokens: the
        transformer reads the real ones alone (`predict`)."""
        (qwen,), (ids, mask) = encoders, token_ids
        mask = mask.to(device).bool()
        states = qwen(input_ids=ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": states, "prompt_mask": mask}

    # ---- training -------------------------------------------------------------------------------
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

        embeds, mask = conditioning["prompt_embeds"], conditioning["prompt_mask"].bool()
        output = denoiser(
            list(noisy.unsqueeze(2).unbind(0)),  # one (C, 1, H, W) a picture
            (1000 - timesteps) / 1000,  # 1 - sigma: the transformer's 1 is the clean picture
            [row[real] for row, real in zip(embeds, mask, strict=True)],
            return_dict=False,
        )[0]
        return -torch.stack(output).squeeze(2)  # its velocity points to the picture; the house's to the noise

    # ---- previews and Generate ------------------------------------------------------------------
    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, Any]:
        """The pipeline's lists of embeddings, one a prompt, with the empty negative prompt's for guidance."""
        embeds, negative = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=True)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    # ---- files made elsewhere -------------------------------------------------------------------
    @classmethod
    def lora_for_diffusers(
        cls, tensors: Mapping[str, torch.Tensor], pipe: DiffusionPipeline
    ) -> dict[str, torch.Tensor] | None:
        """Any of the layouts in the module's docstring in diffusers' names, alpha / rank folded into the down
        weight, a fused qkv's LoRA given to q, k and v (the same down weight, the up weight's rows shared out)."""
        modules = lora_layers(tensors)
        if modules is None:
            return None  # a layout diffusers converts itself (LoKr) or refuses in its own words
        if all(
            key.startswith("transformer.") and not key.endswith(".alpha") and "lora_down" not in key for key in tensors
        ):
            return None  # diffusers' own layout, whose metadata diffusers reads from the file
        places = _LayerPlaces(pipe.transformer)
        converted: dict[str, torch.Tensor] = {}
        for module, parts in modules.items():
            targets = places.find(module)
            if targets is None or not {"down", "up"} <= parts.keys():
                raise ValueError(f"it adapts layers this {cls.title} model does not have, such as {module}")
            down, up = scaled_factors(tensors, parts)
            if up.shape[0] % len(targets):
                raise ValueError(f"{module} has {up.shape[0]} outputs, which don't divide into q, k and v")
            for target, rows in zip(targets, up.chunk(len(targets)), strict=True):
                places.check(target, down, rows, module)
                converted[f"transformer.{target}.lora_A.weight"] = down
                converted[f"transformer.{target}.lora_B.weight"] = rows.contiguous()
        return converted

    @classmethod
    def single_file_companions(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """Turbo's configuration first: its file is the one people download (Comfy-Org's z_image_turbo_bf16), and
        diffusers' own single-file loading takes its config for any Z-Image file; the base's VAE and text encoder
        are the same."""
        base, turbo = cls.hub_models
        return (turbo, base)

    @classmethod
    def denoiser_from_single_file(
        cls, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The original transformer, alone or in an all-in-one file, through diffusers' own converter (q, k and v cut
        in three equal parts, whatever the width), with its depth read from the file."""
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

        prefix = next(
            (p for p in (_ALL_IN_ONE_PREFIX, "diffusion_model.", "") if f"{p}x_embedder.weight" in tensors), None
        )
        if prefix is None:
            raise ValueError(f"it holds no {cls.title} transformer (it has no x_embedder.weight)")
        original = {key[len(prefix) :]: tensors[key] for key in tensors if key.startswith(prefix)}
        weights = convert_z_image_transformer_checkpoint_to_diffusers(original)
        depth = {block: {key.split(".")[1] for key in weights if key.startswith(f"{block}.")} for block in _BLOCKS}
        return weights, dict(n_layers=len(depth["layers"]), n_refiner_layers=len(depth["noise_refiner"]))

    # ---- the estimate and random-weight models --------------------------------------------------
    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        """One picture and a caption of the full 512 tokens (the most a caption reaches)."""
        import torch

        side = resolution // 8
        return dict(
            x=[torch.empty(16, 1, side, side, device="meta", dtype=dtype)],
            t=torch.ones(1, device="meta", dtype=dtype),
            cap_feats=[torch.empty(cls.prompt_tokens, cls.text_width, device="meta", dtype=dtype)],
        )

    @classmethod
    def checkpointed_blocks(cls) -> tuple[type[torch.nn.Module], ...]:
        from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

        return (ZImageTransformerBlock,)

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler

        (tokenizer,), (qwen,) = tokenizers, text_encoders
        # The base model's schedule: a static shift of 6, the same at every picture size.
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)
        # The bare Qwen3 model without its language-model head, as the published model_index names it (Qwen3Model).
        return cls.pipeline_class(
            scheduler=scheduler,
            vae=vae,
            text_encoder=qwen.model,
            tokenizer=tokenizer,
            transformer=cls.build_denoiser(size),
        )


class _LayerPlaces:
    """Where a LoRA file's layer goes in a loaded Z-Image transformer, whatever the tool that wrote it named it: each
    of its linear layers by diffusers' name, the original one, and kohya's spelling of either ("." as "_")."""

    def __init__(self, transformer: torch.nn.Module):
        self.layers = {name: layer for name, layer in transformer.named_modules() if hasattr(layer, "in_features")}
        names: dict[str, tuple[str, ...]] = {name: (name,) for name in self.layers}
        names.update(_ORIGINAL_TOP)
        for block in {name.rsplit(".attention.", 1)[0] for name in self.layers if ".attention." in name}:
            names.update(
                {
                    f"{block}.{original}": tuple(f"{block}.{t}" for t in ts)
                    for original, ts in _ORIGINAL_IN_BLOCK.items()
                }
            )
        self.targets = {
            spelling: targets for name, targets in names.items() for spelling in (name, name.replace(".", "_"))
        }

    def find(self, module: str) -> tuple[str, ...] | None:
        """The diffusers layers a LoRA file's module name stands for; None for a name of no layer here."""
        name = next((module[len(prefix) :] for prefix in _LORA_PREFIXES if module.startswith(prefix)), None)
        return None if name is None else self.targets.get(name)

    def check(self, target: str, down: torch.Tensor, up: torch.Tensor, module: str) -> None:
        """That the layer is as wide as the LoRA reads and writes."""
        layer = self.layers[target]
        if (down.shape[-1], up.shape[0]) != (layer.in_features, layer.out_features):
            raise ValueError(
                f"{module} maps {down.shape[-1]} to {up.shape[0]} features where this model's {target} maps "
                f"{layer.in_features} to {layer.out_features}: it was made for a model of another size"
            )
