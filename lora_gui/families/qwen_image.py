"""Qwen-Image (Qwen's 20 B MMDiT, and its refresh Qwen-Image-2512): a rectified-flow transformer reading Qwen2.5-VL.

One text encoder, Qwen2.5-VL-7B-Instruct, read as diffusers' QwenImagePipeline reads it: each caption put in the
pipeline's own system-prompt template (plain `str.format`, no chat template), its last hidden state, the template's
first 34 tokens (the system prompt and `<|im_start|>user`) dropped, padding masked. It is frozen: it encodes the
captions and preview prompts once, then leaves the GPU. Its own VAE (AutoencoderKLQwenImage, Wan 2.1's causal video
VAE: 5-D pictures of one frame, 16 channels normalized by a per-channel mean and std), whose latents the transformer
reads in 2x2 patches of 64 channels, with each picture's patch grid (`img_shapes`) for its RoPE. The transformer takes
sigma itself as the time (1 = pure noise) and predicts the velocity from the picture to the noise, the house's
objectives.FlowMatching unchanged, as diffusers' train_dreambooth_lora_qwen_image.py trains it. Pictures are made in
50 steps with true classifier-free guidance 4 against a negative prompt (" " when none is given, as the model card
does), the pipeline shifting its schedule by the picture's size (dynamic shifting).

Qwen-Image-2.1 (QwenImage21Pipeline: 7 B, single-stream, Qwen3-VL) is another architecture with other layer names, and
the Edit models take reference pictures: neither is this family.

The file for ComfyUI is musubi-tuner's (kohya's `lora_unet_` names of diffusers' layers, lora_down / lora_up / alpha):
ComfyUI's Qwen-Image model (comfy/ldm/qwen_image/model.py) names its layers as diffusers does, and comfy/lora.py's
model_lora_keys_unet maps `lora_unet_<name, "." as "_">` onto every one of them; diffusers' Qwen-Image loader reads it
too (_convert_non_diffusers_qwen_lora_to_diffusers). tests/test_formats.py checks every key we write against a
transcription of ComfyUI's layer names.

Files from elsewhere: LoRAs of musubi-tuner and kohya (`lora_unet_`), ai-toolkit (`diffusion_model.`, lora_A /
lora_B), ComfyUI (`diffusion_model.` with alphas) are read by diffusers' converter; diffusers' names with alphas
(SimpleTuner's, ComfyUI's `transformer.` keys) are read here, where the converter doubles their prefix. Single-file
checkpoints (Comfy-Org's qwen_image_bf16.safetensors) hold the transformer in diffusers' own names, alone, under
`diffusion_model.` or `model.diffusion_model.`; the VAE and text encoder come from the published model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from lora_gui.families.base import ImageGeometry, Imported
from lora_gui.families.rectified_flow import RectifiedFlowTransformer, lora_layers, scaled_factors

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


QWEN_IMAGE, QWEN_IMAGE_2512 = "Qwen/Qwen-Image", "Qwen/Qwen-Image-2512"
# The pipeline's prompt_template_encode_start_idx: the template's tokens before the caption, which it drops.
TEMPLATE_TOKENS = 34
# The tiny model's caption tokens after the template's (the published pipeline reads up to 512).
TINY_PROMPT_TOKENS = 48
# Where the transformer is in a single-file checkpoint: alone (diffusers' names), ComfyUI's, an all-in-one file.
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# The published scheduler config (Qwen/Qwen-Image's scheduler_config.json): shifted by the picture's size,
# exponentially, the last sigma stretched to 0.02. Training draws from its unshifted table, as diffusers' script does.
_SCHEDULER: dict[str, Any] = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)


class QwenImage(RectifiedFlowTransformer):
    name = "qwen-image"
    title = "Qwen-Image"
    short_title = "Qwen-Image"
    pipeline_class = Imported("diffusers", "QwenImagePipeline")
    denoiser_class = Imported("diffusers", "QwenImageTransformer2DModel")
    # Every linear layer of the blocks but their modulation (img_mod, txt_mod), as musubi-tuner trains it (its
    # networks/lora_qwen_image.py excludes `_mod_`): both streams' attention and MLPs.
    default_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )
    kohya_module_names = True  # musubi-tuner's lora_unet_ names (see above)
    kohya_file_loads_in = "ComfyUI"  # neither AUTOMATIC1111 nor Forge runs this family
    kohya_network_module = "networks.lora_qwen_image"  # musubi-tuner's
    kohya_base_model_version = "qwen_image"
    modelspec_architecture = "Qwen-Image/lora"  # musubi-tuner's (utils/sai_model_spec.py, ARCH_QWEN_IMAGE)
    hub_models = (QWEN_IMAGE, QWEN_IMAGE_2512)
    # Its blocks' modulation, named so by no other family, alone or under ComfyUI's or an all-in-one file's prefix.
    checkpoint_signatures = tuple(f"{prefix}transformer_blocks.0.img_mod.1." for prefix in _CHECKPOINT_PREFIXES)
    text_width = 3584  # Qwen2.5-VL-7B's
    lora_signatures = tuple(
        f"{prefix}transformer_blocks{'_0_' if prefix == 'lora_unet_' else '.0.'}{stream}"
        for prefix in ("transformer.", "diffusion_model.", "lora_unet_")
        for stream in ("img_mlp", "txt_mlp", "img_mod", "txt_mod")
    )
    prompt_tokens = 512  # the pipeline's max_sequence_length, after the template's 34 tokens
    # Qwen2.5-VL-7B-Instruct as the pipeline loads it: its language model (7.07 B), the head it never runs (0.55 B) and
    # the vision tower text-to-image never runs (0.68 B) are all in memory.
    text_encoder_params = 8.29e9
    # Streamed on a card it doesn't fit whole: its embeddings and output head (545 M each), vision tower (677 M) and
    # one of its 28 layers (233 M) stay on the GPU.
    text_encoder_streamed_share = 0.24
    swap_blocks = ("transformer_blocks",)  # 60 blocks of 340 M parameters (0.68 GB each in bf16)
    vae_params = 126.9e6  # AutoencoderKLQwenImage: encoder 53.6 M, decoder 73.3 M
    random_text_encoders = ("qwen2.5-vl-7b",)
    random_vae: ClassVar[dict[str, Any]] = dict(vae_class="AutoencoderKLQwenImage")
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {
        "qwen-image-tiny": ("tiny", 128),
        "qwen-image-shallow": ("shallow", 512),
        "qwen-image": ("full", 1024),
    }
    reference_script = "train_dreambooth_lora_qwen_image.py"
    reference_targets = ("to_k", "to_q", "to_v", "to_out.0")  # its defaults: the image stream's attention
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # tiny.py's Qwen2.5-VL is 32 wide
            axes_dims_rope=(4, 6, 6),
        ),
        # The full width with 2 of its 60 blocks: a slice a CPU holds, whose speed scales to the whole block by block.
        "shallow": dict(num_layers=2),
        "full": {},  # the published config is diffusers' defaults
    }
    default_steps = 50
    default_guidance = 4.0  # true_cfg_scale
    negative_prompt = True
    pipeline_dtype = "bfloat16"
    too_large_for_one_gpu = "The whole of Qwen-Image is 58 GB in bf16"

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        return model_index.get("_class_name") == "QwenImagePipeline"

    @classmethod
    def bucket_step(cls, pipe: DiffusionPipeline) -> int:
        return pipe.vae_scale_factor * 2

    @classmethod
    def cross_attention_width(cls, pipe: DiffusionPipeline) -> int:
        return pipe.transformer.config.joint_attention_dim

    # ---- conditioning ---------------------------------------------------------------------------
    @classmethod
    def tokenize(cls, pipe: DiffusionPipeline, captions: list[str]) -> list[torch.Tensor]:
        """Each caption in the pipeline's template, padded to one length: the token ids and which are real."""
        tokens = pipe.tokenizer(
            [pipe.prompt_template_encode.format(caption) for caption in captions],
            padding="max_length",
            max_length=TEMPLATE_TOKENS + cls._caption_tokens(pipe),
            truncation=True,
            return_tensors="pt",
        )
        return [tokens.input_ids, tokens.attention_mask]

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL's last hidden state after the template's first tokens, zero where padded, and the mask of the
        real tokens, as the pipeline's encode_prompt gives them (padded further, which the mask hides)."""
        (qwen,), (ids, mask) = encoders, token_ids
        mask = mask.to(device)
        # The model without its language-model head: the same hidden states, without logits over 152k words.
        model = getattr(qwen, "model", qwen)
        states = model(input_ids=ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        states, mask = states[:, TEMPLATE_TOKENS:], mask[:, TEMPLATE_TOKENS:]
        return {"prompt_embeds": states * mask.unsqueeze(-1).to(states.dtype), "prompt_embeds_mask": mask}

    # ---- training -------------------------------------------------------------------------------
    @classmethod
    def latent_distribution(cls, vae: torch.nn.Module, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        """Pictures as the one frame of a video, the frame axis gone from the distribution."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(vae.encode(pixels.unsqueeze(2)).latent_dist.parameters[:, :, 0])

    @classmethod
    def latents_for_denoiser(cls, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        mean, std = _statistics(vae, latents)
        return (latents - mean) / std

    @classmethod
    def predict(
        cls,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        geometry: list[ImageGeometry],
    ) -> torch.Tensor:
        pipeline_class = cls.pipeline_class
        count, channels, height, width = noisy.shape
        mask = conditioning["prompt_embeds_mask"]
        # The batch's longest caption: the padding after it, which the mask hides anyway, costs attention for nothing.
        length = int(mask.sum(dim=1).max())
        prediction = denoiser(
            hidden_states=pipeline_class._pack_latents(noisy, count, channels, height, width),
            encoder_hidden_states=conditioning["prompt_embeds"][:, :length],
            encoder_hidden_states_mask=mask[:, :length],
            timestep=timesteps / 1000,  # sigma: the transformer scales it back to the schedule's timesteps
            img_shapes=[[(1, height // 2, width // 2)]] * count,
            return_dict=False,
        )[0]
        return pipeline_class._unpack_latents(prediction, height * 8, width * 8, 8).squeeze(2)

    # ---- previews and Generate ------------------------------------------------------------------
    @classmethod
    def prompt_options(cls, pipe: DiffusionPipeline) -> dict[str, Any]:
        """The caption length training reads (512 tokens; the tiny model's 48)."""
        return {"max_sequence_length": cls._caption_tokens(pipe)}

    @classmethod
    def guidance_options(cls, guidance: float, negative_prompt: str) -> dict[str, Any]:
        """True classifier-free guidance (`true_cfg_scale`: `guidance_scale` is for guidance-distilled models), which
        the pipeline runs only against a negative prompt: " " when none is given, as the model card's example."""
        return {"true_cfg_scale": guidance, "negative_prompt": negative_prompt or " "}

    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, Any]:
        """The prompt's embeddings and mask, and the negative prompt's (" "), which the pipeline guides against."""
        options = cls.prompt_options(pipe)
        embeds, mask = pipe.encode_prompt(prompt=prompt, device=device, **options)
        negative, negative_mask = pipe.encode_prompt(prompt=" ", device=device, **options)
        return {
            "prompt_embeds": embeds,
            "prompt_embeds_mask": mask,
            "negative_prompt_embeds": negative,
            "negative_prompt_embeds_mask": negative_mask,
        }

    @classmethod
    def latents_for_vae(cls, pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's packed latents as one frame (B, 16, 1, h, w), their normalization undone."""
        latents = cls.pipeline_class._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        mean, std = _statistics(pipe.vae, latents)
        return latents * std + mean

    @classmethod
    def _caption_tokens(cls, pipe: DiffusionPipeline) -> int:
        return min(cls.prompt_tokens, pipe.tokenizer.model_max_length)

    # ---- files made elsewhere -------------------------------------------------------------------
    @classmethod
    def lora_for_diffusers(
        cls, tensors: Mapping[str, torch.Tensor], pipe: DiffusionPipeline
    ) -> dict[str, torch.Tensor] | None:
        """diffusers' names with alphas (`transformer.` and `.alpha`), alpha / rank folded into the down weight: the
        converter would read them as `transformer.transformer.`. diffusers reads every other layout itself."""
        keys = list(tensors)
        if not any(key.endswith(".alpha") for key in keys) or not all(key.startswith("transformer.") for key in keys):
            return None
        modules = lora_layers(tensors)
        if modules is None:
            return None  # a layout diffusers reads or refuses in its own words
        converted: dict[str, torch.Tensor] = {}
        for module, parts in modules.items():
            try:
                down, up = scaled_factors(tensors, parts)
            except KeyError:
                raise ValueError(f"{module} lacks its down or up weight") from None
            converted[f"{module}.lora_A.weight"], converted[f"{module}.lora_B.weight"] = down, up
        return converted

    @classmethod
    def single_file_companions(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        return cls.hub_models

    @classmethod
    def denoiser_from_single_file(
        cls, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The transformer in diffusers' names (ComfyUI's are the same), with its shape read from the file."""
        prefix = next((p for p in _CHECKPOINT_PREFIXES if f"{p}txt_in.weight" in tensors), None)
        if prefix is None:
            raise ValueError(f"it holds no {cls.title} transformer (it has no txt_in.weight)")
        weights = {key[len(prefix) :]: tensors[key] for key in tensors if key.startswith(prefix)}
        width, text_width = weights["txt_in.weight"].shape
        head_width = weights["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        patch = 2  # every published model's; the file doesn't show it apart from the channels
        shape = dict(
            num_layers=len({key.split(".")[1] for key in weights if key.startswith("transformer_blocks.")}),
            attention_head_dim=head_width,
            num_attention_heads=width // head_width,
            joint_attention_dim=text_width,
            in_channels=weights["img_in.weight"].shape[1],
            out_channels=weights["proj_out.weight"].shape[0] // patch**2,
        )
        return weights, shape

    # ---- the estimate and random-weight models --------------------------------------------------
    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        """One picture and a caption of the full 512 tokens (the most a caption reaches)."""
        import torch

        side = resolution // 16
        return dict(
            hidden_states=torch.empty(1, side * side, 64, device="meta", dtype=dtype),
            encoder_hidden_states=torch.empty(1, cls.prompt_tokens, cls.text_width, device="meta", dtype=dtype),
            timestep=torch.ones(1, device="meta", dtype=dtype),
            img_shapes=[[(1, side, side)]],
        )

    @classmethod
    def checkpointed_blocks(cls) -> tuple[type[torch.nn.Module], ...]:
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

        return (QwenImageTransformerBlock,)

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler

        (tokenizer,), (qwen,) = tokenizers, text_encoders
        if size == "tiny":
            tokenizer.model_max_length = TINY_PROMPT_TOKENS
        return cls.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER),
            vae=vae,
            text_encoder=qwen,
            tokenizer=tokenizer,
            transformer=cls.build_denoiser(size),
        )


def _statistics(vae: torch.nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std, shaped to broadcast over these latents (4-D or one frame's 5-D)."""
    import torch

    shape = (1, -1, *[1] * (latents.ndim - 2))
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return mean, std
