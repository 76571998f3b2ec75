"""Chroma (lodestones' Chroma1-HD and Chroma1-Base): Flux.1-schnell's transformer, reworked and trained anew.

What differs from Flux.1 (whose family this one extends): one text encoder, T5-XXL, read with its attention mask (no
CLIP, no pooled vector); no guidance input, and no modulation layer in any block: one MLP shared by all of them (the
"distilled guidance layer", an approximator) gives every block its modulation from the time alone. It stays frozen,
as every trainer keeps it. Pictures are made with real classifier-free guidance against a negative prompt. Same VAE,
2x2 patches, position ids, objective (the velocity from the picture to the noise) and layer names as Flux.1.

The transformer reads a caption's real tokens and the first padding token, the rest of its padding masked out.
diffusers' ChromaPipeline means to do that but builds the mask in floats, which attention adds to its scores instead
of masking (diffusers issues #13619, #12116): a bool mask is what the pipeline intends, what the model was trained on.
So training reads each caption's real tokens and one pad (the batch's padding beyond that cut off, a shorter caption's
masked by a bool mask), previews pass bool masks, and a loaded pipeline's transformer turns a float mask into bool
(`prepare_pipeline`). With gradient checkpointing diffusers also drops the mask in the single blocks: `predict` hands it
to them.

The file for ComfyUI and Forge keeps diffusers' `transformer.` names with each layer's alpha, as Flux.1's does:
ComfyUI's Chroma is a Flux model (comfy/model_base.py: `class Chroma(Flux)`), so comfy/lora.py maps them through
comfy.utils.flux_to_diffusers, which has every layer the LoRA trains. Files from elsewhere, read as Flux.1's are
(`Flux1.lora_for_diffusers`): kohya's sd-scripts (`--model_type chroma`: `lora_unet_` and Black Forest Labs' names),
ai-toolkit's (`diffusion_model.` and Black Forest Labs' names with lora_A / lora_B, which diffusers' loader silently
ignores) and ComfyUI's; single-file checkpoints in Black Forest Labs' names (lodestones' Chroma1-HD.safetensors), with
the VAE and T5 from the download cache's Chroma1-HD or Chroma1-Base.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import ImageGeometry, Imported
from lora_gui.families.flux import (
    _DOUBLE_BLOCK_LAYERS,
    _ORIGINAL_LAYERS,
    _SINGLE_BLOCK_LAYERS,
    DYNAMIC_SHIFT_SCHEDULE,
    Flux1,
)
from lora_gui.families.rectified_flow import BlackForestLabsNames

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

HD, BASE = "lodestones/Chroma1-HD", "lodestones/Chroma1-Base"
# The tiny model's token length (the published tokenizer reads 512).
TINY_PROMPT_TOKENS = 48
# The most layers of its approximator a LoRA file or a checkpoint may name (the published model's 5).
_MOST_APPROXIMATOR_LAYERS = 16
# Flux.1's layers but its modulation and its time, text and guidance embedders, which Chroma doesn't have; and its
# approximator's (Black Forest Labs' `in_layer` / `out_layer`, diffusers' `linear_1` / `linear_2`).
_APPROXIMATOR = {
    "distilled_guidance_layer.in_proj": ("distilled_guidance_layer.in_proj",),
    "distilled_guidance_layer.out_proj": ("distilled_guidance_layer.out_proj",),
}
for _index in range(_MOST_APPROXIMATOR_LAYERS):
    _layer = f"distilled_guidance_layer.layers.{_index}"
    _APPROXIMATOR[f"{_layer}.in_layer"] = (f"{_layer}.linear_1",)
    _APPROXIMATOR[f"{_layer}.out_layer"] = (f"{_layer}.linear_2",)
    _APPROXIMATOR[f"distilled_guidance_layer.norms.{_index}"] = (f"distilled_guidance_layer.norms.{_index}",)
_NAMES = BlackForestLabsNames(
    {**{name: _ORIGINAL_LAYERS[name] for name in ("img_in", "txt_in", "final_layer.linear")}, **_APPROXIMATOR},
    {name: layers for name, layers in _DOUBLE_BLOCK_LAYERS.items() if not name.endswith("_mod.lin")},
    {name: layers for name, layers in _SINGLE_BLOCK_LAYERS.items() if name != "modulation.lin"},
)
_CHECKPOINT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


class Chroma(Flux1):
    name = "chroma"
    title = "Chroma"
    short_title = "Chroma"
    pipeline_class = Imported("diffusers", "ChromaPipeline")
    denoiser_class = Imported("diffusers", "ChromaTransformer2DModel")
    # The LoRA's layers are Flux.1's defaults (`default_target_modules`), which Chroma's blocks all have: they lack
    # only their modulation, never a default. The approximator stays frozen.
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    original_names = _NAMES
    clip_name = None
    kohya_text_encoder_prefixes = ("lora_te1",)  # never written: T5 stays frozen
    kohya_network_module = "networks.lora_flux"  # sd-scripts trains Chroma with its Flux network
    kohya_base_model_version = "chroma"  # ai-toolkit's
    modelspec_architecture = "chroma/lora"  # sd-scripts'
    # Chroma1-HD first: lodestones' choice for a LoRA at high resolution; Chroma1-Base is the 512 px pretraining, which
    # sd-scripts' docs and ai-toolkit's preset train on. Neither is distilled.
    hub_models = (HD, BASE)
    checkpoint_signatures = tuple(f"{prefix}distilled_guidance_layer.in_proj." for prefix in _CHECKPOINT_PREFIXES)
    # Only a LoRA on the approximator shows Chroma by its names: every other layer is named as Flux.1's.
    lora_signatures = tuple(
        f"{prefix}distilled_guidance_layer" for prefix in ("transformer.", "diffusion_model.", "lora_unet_")
    )
    text_encoder_params = 4.76e9  # T5-XXL's encoder alone
    random_text_encoders = ("t5",)
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {
        "chroma-tiny": ("tiny", 128),
        "chroma-shallow": ("shallow", 512),
        "chroma": ("full", 1024),
    }
    # diffusers has no Chroma training script. Its Flux.1 one takes the step a Chroma one would (the same patches, ids,
    # sigmas and target, with this family's inputs), so the benchmark times that loop, with its default layers.
    reference_script = "train_dreambooth_lora_flux.py"
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # tiny.py's T5
            axes_dims_rope=(4, 6, 6),
            approximator_hidden_dim=32,
            approximator_layers=2,
        ),
        # The published width with one of its 19 double blocks and two of its 38 single ones, the approximator whole.
        "shallow": dict(num_layers=1, num_single_layers=2),
        "full": {},  # ChromaTransformer2DModel's defaults are Chroma1-HD's shape
    }
    # ChromaPipeline's defaults: real guidance against a negative prompt.
    default_steps = 35
    default_guidance = 5.0
    negative_prompt = True
    # In bf16, the transformer's 8.9 B parameters and T5-XXL's 4.8 B: more than a 24 GB card holds.
    too_large_for_one_gpu = "The whole of Chroma is ~27 GB"

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "ChromaPipeline"

    @classmethod
    def variant(cls, pipe: DiffusionPipeline) -> str:
        return ""

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        return cls.modelspec_architecture

    @classmethod
    def generation_defaults(cls, pipe: DiffusionPipeline) -> tuple[int, float]:
        return cls.default_steps, cls.default_guidance

    @classmethod
    def prepare_pipeline(cls, pipe: DiffusionPipeline) -> None:
        """The transformer reads the float mask ChromaPipeline makes of a prompt as the bool mask it means."""
        transformer = pipe.transformer
        if not getattr(transformer, "_bool_attention_mask", False):
            transformer.register_forward_pre_hook(_bool_mask, with_kwargs=True)
            transformer._bool_attention_mask = True

    # ---- conditioning ---------------------------------------------------------------------------
    @classmethod
    def tokenize(cls, pipe: DiffusionPipeline, captions: list[str]) -> list[torch.Tensor]:
        """T5's token ids padded to its tokenizer's length, as the pipeline pads them, and the mask of the real ones."""
        tokenizer = pipe.tokenizer
        tokens = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return [tokens.input_ids, tokens.attention_mask]

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """T5's last hidden state, read with its mask as the pipeline does, and the tokens the transformer reads: the
        real ones and the first padding token."""
        import torch

        (t5,), (ids, mask) = encoders, token_ids
        mask = mask.to(device)
        embeds = t5(ids.to(device), attention_mask=mask, output_hidden_states=False)[0]
        positions = torch.arange(mask.shape[1], device=device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": positions[None] <= mask.sum(1, keepdim=True)}

    @classmethod
    def prompt_options(cls, pipe: DiffusionPipeline) -> dict[str, Any]:
        """T5's length, which training pads captions to (the tiny model reads 48 tokens)."""
        return {"max_sequence_length": pipe.tokenizer.model_max_length}

    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The prompt's and the empty negative prompt's embeddings with bool masks (see above): the pipeline would
        otherwise encode the negative prompt with T5, which has left the GPU."""
        embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt="",
            device=device,
            do_classifier_free_guidance=True,
            **cls.prompt_options(pipe),
        )
        return {
            "prompt_embeds": embeds,
            "prompt_attention_mask": mask.bool(),
            "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask.bool(),
        }

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
        """The pipeline's transformer call on the batch's tokens up to its longest caption's first pad (the rest, all
        masked, changes nothing but the cost), with a bool mask where its captions' lengths differ."""
        import torch

        pipeline_class = cls.pipeline_class
        batch, channels, height, width = noisy.shape
        reads = conditioning["prompt_attention_mask"]
        length = int(reads.sum(1).max())
        text, reads = conditioning["prompt_embeds"][:, :length], reads[:, :length]
        image_ids = pipeline_class._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        mask = None
        if not bool(reads.all()):
            mask = torch.cat([reads, torch.ones(batch, len(image_ids), dtype=torch.bool, device=reads.device)], dim=1)
        with _mask_in_checkpointed_single_blocks(getattr(denoiser, "module", denoiser), mask):
            prediction = denoiser(
                hidden_states=pipeline_class._pack_latents(noisy, batch, channels, height, width),
                timestep=timesteps / 1000,  # the transformer scales it back to the schedule's timesteps
                encoder_hidden_states=text,
                txt_ids=torch.zeros(length, 3, device=noisy.device, dtype=noisy.dtype),
                img_ids=image_ids,
                attention_mask=mask,
                return_dict=False,
            )[0]
        return pipeline_class._unpack_latents(prediction, height, width, 1)

    # ---- files made elsewhere -------------------------------------------------------------------
    @classmethod
    def single_file_companions(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """Chroma1-HD, else Chroma1-Base: the same configuration, VAE and T5."""
        return cls.hub_models

    @classmethod
    def denoiser_from_single_file(
        cls, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Black Forest Labs' Chroma transformer with its widths, depth and approximator read from the file: diffusers'
        own converter assumes the published width."""
        weights, shape = cls.original_weights(tensors)
        approximator = weights.get("distilled_guidance_layer.in_proj.weight")
        if approximator is None:
            raise ValueError(f"it holds no {cls.title} transformer (it has no distilled_guidance_layer)")
        layers = {key.split(".")[2] for key in weights if key.startswith("distilled_guidance_layer.layers.")}
        return weights, {
            **shape,
            "approximator_hidden_dim": approximator.shape[0],
            "approximator_num_channels": approximator.shape[1],
            "approximator_layers": len(layers),
        }

    # ---- the estimate and random-weight models --------------------------------------------------
    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        inputs = super().meta_inputs(resolution, dtype)
        del inputs["pooled_projections"], inputs["guidance"]
        return inputs

    @classmethod
    def checkpointed_blocks(cls) -> tuple[type[torch.nn.Module], ...]:
        from diffusers.models.transformers.transformer_chroma import (
            ChromaSingleTransformerBlock,
            ChromaTransformerBlock,
        )

        return (ChromaTransformerBlock, ChromaSingleTransformerBlock)

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler

        (tokenizer,), (t5,) = tokenizers, text_encoders
        if size == "tiny":
            tokenizer.model_max_length = TINY_PROMPT_TOKENS
        return cls.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler(**DYNAMIC_SHIFT_SCHEDULE),
            vae=vae,
            text_encoder=t5,
            tokenizer=tokenizer,
            transformer=cls.build_denoiser(size),
        )


def _bool_mask(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """A forward pre-hook: a float attention mask of ones and zeros (ChromaPipeline's) as the bool mask it means."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attention_mask"] = mask > 0.5
    return args, kwargs


@contextmanager
def _mask_in_checkpointed_single_blocks(transformer: torch.nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """Gradient checkpointing's call of each single block with `mask` too: diffusers' ChromaTransformer2DModel leaves
    it out there (double blocks get it), which would let those blocks read the padding."""
    checkpoint = getattr(transformer, "_gradient_checkpointing_func", None)
    if mask is None or checkpoint is None:
        yield
        return
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

    def with_mask(block: torch.nn.Module, *args: Any) -> Any:
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:  # hidden states, time, rotary
            args = (*args, mask)
        return checkpoint(block, *args)

    transformer._gradient_checkpointing_func = with_mask
    try:
        yield
    finally:
        transformer._gradient_checkpointing_func = checkpoint
