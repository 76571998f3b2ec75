"""The interface every base-model family implements: the one place that knows a kind of model.

A family says what its pipeline holds (the denoiser the LoRA trains, the text encoders and their
tokenizers), how captions become the denoiser's conditioning, what the denoiser is trained to
predict (its objective) and how it is called, the names other tools give its parts, how its
single-file checkpoints and its files on disk show it, the constants the memory estimate needs,
its random-weight shapes for tests, and its generation defaults. Everything else (loading, LoRA
injection, the loop, saving, the app) asks the family and never tests its name.

The defaults here are Stable Diffusion's (a UNet with cross-attention, noise prediction through a
DDPM schedule); a family overrides what differs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from lora_gui.objectives import Objective


class Imported:
    """A family's class attribute naming a class of diffusers (its pipeline, its denoiser), imported on first access.

    A family's names, titles and defaults are what the app's menus and the settings' choices read, before torch and
    diffusers are loaded (11 s): the classes come when the engine first asks for one."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __get__(self, instance: object, owner: type) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training image came from: SDXL conditions on this; other families ignore it."""

    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in resized pixels
    target_size: tuple[int, int]  # (height, width) of the bucket


class Family:
    name: ClassVar[str]
    title: ClassVar[str]
    short_title: ClassVar[str]  # as a menu names it: "SD 1.5", "SDXL"
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    default_resolution: ClassVar[int]
    # The pipeline attribute of the denoiser, the model the LoRA trains, and the layers of it that get a LoRA
    # unless the settings name others.
    denoiser_name: ClassVar[str] = "unet"
    denoiser_class: ClassVar[type[torch.nn.Module]] = Imported("diffusers", "UNet2DConditionModel")
    denoiser_title: ClassVar[str] = "UNet"  # as a sentence names it
    default_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # Pipeline attributes of the text encoders and their tokenizers, in order, and whether a LoRA may train
    # on the text encoders too.
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    trains_text_encoders: ClassVar[bool] = True
    # The file for AUTOMATIC1111, Forge and ComfyUI: kohya's prefix for each text encoder, whether the
    # denoiser's layers take kohya's names too (lora_unet_...) or keep diffusers' (transformer....), which
    # network module kohya's metadata names, and what kohya (ss_base_model_version) and Stability's
    # modelspec call this architecture.
    kohya_text_encoder_prefixes: ClassVar[tuple[str, ...]] = ("lora_te",)
    kohya_module_names: ClassVar[bool] = True
    # Whether that file folds each plain LoRA layer's alpha / rank into its up weight and writes no alpha, for a
    # family whose diffusers loader refuses alpha tensors (Flux.2's).
    kohya_alpha_folded: ClassVar[bool] = False
    # The programs that file loads in, as the page tells a person which file to take.
    kohya_file_loads_in: ClassVar[str] = "AUTOMATIC1111, Forge and ComfyUI"
    kohya_network_module: ClassVar[str] = "networks.lora"
    # Whether that file's plain LoRA layers carry their scale (alpha / rank) in their up weights instead of an
    # `.alpha` beside them (which every tool then reads as 1): where diffusers' loader for the family misreads
    # diffusers' names with alphas (Z-Image's).
    kohya_alpha_folded: ClassVar[bool] = False
    kohya_base_model_version: ClassVar[str]
    modelspec_architecture: ClassVar[str]
    # The family's published Hub models, known by name before anything of them is downloaded.
    hub_models: ClassVar[tuple[str, ...]] = ()
    # Tensor-name prefixes that only this family's original single-file checkpoints hold.
    checkpoint_signatures: ClassVar[tuple[str, ...]]
    # The width of the text features the published denoiser's cross-attention reads: a LoRA's down
    # weights there tell which family it was made for.
    text_width: ClassVar[int]
    # Tensor-name prefixes that show a LoRA file was made for this family when its metadata doesn't say: the
    # names of a part only this family's LoRAs adapt (the first family, whose LoRAs show none, is the fallback).
    lora_signatures: ClassVar[tuple[str, ...]] = ()
    # The tokens of a caption the denoiser gets to read, start and end tokens included: CLIP's 77 unless the
    # family's longest text encoder reads more. The rest is cut off.
    prompt_tokens: ClassVar[int] = 77
    # Parameters of the published text encoders and VAE, for the memory estimate.
    text_encoder_params: ClassVar[float]
    # Of those, the ones transformers keeps in fp32 when the rest loads in fp16 (T5's `wo` layers, which overflow
    # fp16): 2 bytes more each under fp16.
    text_encoder_fp32_params: ClassVar[float] = 0
    vae_params: ClassVar[float] = 84e6
    # Of those, the share on the GPU while the text encoders encode with their layers streamed (devices.Offload, where
    # they don't fit the card whole: all but each encoder's layers, and one layer): its embeddings, and for a
    # multimodal encoder the vision tower and output head, over all its parameters. 1: the estimate never counts them
    # streamed (their whole fits beside what training needs anyway).
    text_encoder_streamed_share: ClassVar[float] = 1.0
    # Block swap (TrainConfig.blocks_to_swap): the denoiser's lists of blocks (attributes holding an nn.ModuleList),
    # in the order they run, whose blocks may wait in the computer's memory and come to the GPU one at a time. The
    # engine streams a run's `blocks_to_swap` of them evenly spaced over that order, through a ring of two GPU slots;
    # the estimate measures each block on the published model (the meta device, as the rest of its cost) and counts
    # the same. Flux.1's: its 19 double-stream blocks of 340 M parameters, then its 38 single-stream ones of 142 M.
    # Empty: the family's blocks don't swap: a UNet's differ at every level, swapping them breaks its backward pass (a
    # weight autograd kept is overwritten in its slot, measured on the tiny SD 1.5), and the whole fits a common card.
    swap_blocks: ClassVar[tuple[str, ...]] = ()
    # Editing models (Flux.1 Kontext): how many pictures to edit ("before" pictures) its pipeline takes with the
    # instruction; 0: it makes pictures from text alone. Such a family trains on edit pairs (run_dataset.py): `predict`
    # finds the "before" picture's latents, scaled as the noisy ones are, in conditioning["reference_latents"], and
    # `reference_options` tells the pipeline the pictures to edit.
    reference_images: ClassVar[int] = 0
    # The denoiser's constructor arguments by size ("tiny", "full"); see `build_denoiser`.
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]]
    # The random-weight model's parts that tiny.py makes, in the pipeline's order: its text encoders (tiny.py's
    # kinds) and what its VAE sets beside the shared shape; `random_pipeline` assembles them.
    random_text_encoders: ClassVar[tuple[str, ...]] = ("clip-l",)
    # Words its random tokenizers know whole besides tiny.py's, for a pipeline that puts a text of its own before every
    # prompt (Flux.2 dev's system message): spelled out byte by byte it would leave no room for the prompt.
    tokenizer_words: ClassVar[tuple[str, ...]] = ()
    random_vae: ClassVar[dict[str, Any]]
    # The noise schedule its random model's scheduler has: Stable Diffusion's, which every SD 1.x, 2.x and XL
    # scheduler config shares.
    noise_schedule: ClassVar[dict[str, Any]] = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    # `python -m lora_gui bench`: the benchmark's models of this family (name: size in `build_denoiser`, default
    # resolution), and the diffusers example script whose training step its step is timed against.
    bench_models: ClassVar[dict[str, tuple[str, int]]] = {}
    reference_script: ClassVar[str] = "train_text_to_image_lora.py"
    # The denoiser's layers that script puts a LoRA on by default.
    reference_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    # Its published distilled models (few-step, guidance-free: Z-Image Turbo, Flux.2 klein) by Hub id -> the base
    # model each was distilled from, where that base is published. Training on a distilled model undoes its
    # distillation (its few-step pictures blur), so a run asked to train on one trains on its base, as the field
    # does, and the LoRA is used on either.
    distilled_bases: ClassVar[dict[str, str]] = {}
    # Generating: the steps and guidance its pictures are usually made with, and whether it takes a
    # negative prompt.
    default_steps: ClassVar[int] = 25
    default_guidance: ClassVar[float] = 7.0
    negative_prompt: ClassVar[bool] = True
    # What the model card's code runs the base in: the torch dtype its pipeline is meant for, and, for a pipeline
    # too large for a common GPU, the sentence saying why (the card's code then offloads it part by part instead of
    # moving it whole).
    pipeline_dtype: ClassVar[str] = "float16"
    too_large_for_one_gpu: ClassVar[str | None] = None

    # ---- telling a model's family ---------------------------------------------------------------
    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        """Whether a loaded pipeline is of this family, judged from its modules and configs."""
        raise NotImplementedError

    @classmethod
    def matches_files(cls, model_index: dict[str, Any], text_encoder_config: dict[str, Any] | None) -> bool:
        """The same judgement from a model's config files alone (model_index.json, text_encoder/config.json),
        without loading or downloading anything."""
        raise NotImplementedError

    @classmethod
    def is_checkpoint(cls, keys: list[str]) -> bool:
        """Whether an original-format checkpoint with these tensor names is of this family: here, whether it holds a
        tensor under one of `checkpoint_signatures`."""
        return any(key.startswith(cls.checkpoint_signatures) for key in keys)

    @classmethod
    def variant(cls, pipe: DiffusionPipeline) -> str:
        """Which of the family's models this is, where that changes what a LoRA for it is called."""
        return ""

    @classmethod
    def modelspec_architecture_of(cls, prediction_type: str, variant: str = "") -> str:
        """Modelspec's name for a LoRA of this family whose base predicts `prediction_type`."""
        return cls.modelspec_architecture

    @classmethod
    def lora_targets(cls, target_modules: list[str]) -> list[str]:
        """The denoiser's layers that get a LoRA: those the settings name, else the family's usual ones."""
        return list(target_modules) or list(cls.default_target_modules)

    @classmethod
    def prepare_pipeline(cls, pipe: DiffusionPipeline) -> None:
        """What a loaded pipeline of this family needs before it trains or generates, for a diffusers pipeline that
        would not run its denoiser as the family trains it (Chroma's attention mask); nothing here."""

    # ---- the parts ------------------------------------------------------------------------------
    @classmethod
    def denoiser(cls, pipe: DiffusionPipeline) -> torch.nn.Module:
        return getattr(pipe, cls.denoiser_name)

    @classmethod
    def text_encoders(cls, pipe: DiffusionPipeline) -> list[torch.nn.Module]:
        return [getattr(pipe, name) for name in cls.text_encoder_names]

    @classmethod
    def bucket_step(cls, pipe: DiffusionPipeline) -> int:
        """Bucket sides must survive the VAE's and the UNet's downsampling: 64 px for SD, less for tiny models."""
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        return vae_factor * unet_factor

    @classmethod
    def cross_attention_width(cls, pipe: DiffusionPipeline) -> int:
        """The width of the text features this loaded model's cross-attention reads."""
        return pipe.unet.config.cross_attention_dim

    # ---- conditioning ---------------------------------------------------------------------------
    @classmethod
    def tokenize(cls, pipe: DiffusionPipeline, captions: list[str]) -> list[torch.Tensor]:
        """Token ids for each tokenizer, padded to its full length as the pipelines do."""
        ids = []
        for name in cls.tokenizer_names:
            tokenizer = getattr(pipe, name)
            ids.append(
                tokenizer(
                    captions,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
        return ids

    @classmethod
    def encode(
        cls, encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of token ids: a dict of tensors with the batch first.

        `encoders` are the family's text encoders in order, as the caller runs them (wrapped for
        several processes when they train), on `device`."""
        raise NotImplementedError

    # ---- training -------------------------------------------------------------------------------
    @classmethod
    def objective(cls, pipe: DiffusionPipeline, snr_gamma: float) -> Objective:
        """What noise training adds and what the denoiser predicts: here the noise or the velocity, as
        the base's own scheduler says, through its DDPM schedule."""
        from diffusers import DDPMScheduler

        from lora_gui.objectives import NoisePrediction

        return NoisePrediction(DDPMScheduler.from_config(pipe.scheduler.config), snr_gamma)

    @classmethod
    def predict(
        cls,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        geometry: list[ImageGeometry],
    ) -> torch.Tensor:
        """The denoiser's prediction for noisy latents, in the latents' own layout."""
        kwargs = cls.unet_kwargs(conditioning, geometry, noisy.device)
        return denoiser(noisy, timesteps, **kwargs, return_dict=False)[0]

    @classmethod
    def unet_kwargs(
        cls, conditioning: dict[str, torch.Tensor], geometry: list[ImageGeometry], device: torch.device
    ) -> dict[str, Any]:
        """Keyword arguments for `unet(noisy_latents, timesteps, **kwargs)`."""
        raise NotImplementedError

    # ---- previews and Generate ------------------------------------------------------------------
    @classmethod
    def preview_scheduler(cls, pipe: DiffusionPipeline) -> Any:
        """The sampler previews use: DPM-Solver++, which makes a fair picture in 20 steps."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

    @classmethod
    def prompt_embeddings(cls, pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own prompt encoding, with guidance, as keyword arguments for calling it without prompts."""
        encoded = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return dict(zip(names, encoded, strict=False))

    @classmethod
    def latent_distribution(cls, vae: torch.nn.Module, pixels: torch.Tensor) -> Any:
        """The VAE's latent distribution of a batch of pictures (B, 3, H, W), as (B, C, h, w): the VAE's own."""
        return vae.encode(pixels).latent_dist

    @classmethod
    def latents_for_denoiser(cls, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE's encoder gives them (B, C, h, w), in the layout and scale the denoiser is trained on:
        here shifted and scaled by the VAE's config, as the pipelines undo before decoding."""
        config = vae.config
        return (latents - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    @classmethod
    def latents_for_vae(cls, pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The latents a pipeline returns (output_type "latent") as its VAE's decoder reads them: the scaling undone
        exactly as the pipeline would (SDXL's VAE may name a per-channel mean and std), the layout its own."""
        import torch

        config = pipe.vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor + (config.get("shift_factor") or 0.0)

    @classmethod
    def resolution_hint(cls, resolution: int) -> str:
        """A word of advice when training at this resolution will disappoint; "" when it is fine."""
        return ""

    @classmethod
    def generation_defaults(cls, pipe: DiffusionPipeline) -> tuple[int, float]:
        """The steps and guidance this loaded model's pictures are usually made with."""
        return cls.default_steps, cls.default_guidance

    @classmethod
    def guidance_options(cls, guidance: float, negative_prompt: str) -> dict[str, Any]:
        """How its pipeline is told Generate's guidance and negative prompt ("" for none)."""
        # A family without negative prompts (Flux.1) would take one as a second, slower guidance pass.
        negative = {"negative_prompt": negative_prompt or None} if cls.negative_prompt else {}
        return {"guidance_scale": guidance, **negative}

    @classmethod
    def reference_options(
        cls, pipe: DiffusionPipeline, images: list[Image.Image], width: int, height: int
    ) -> dict[str, Any]:
        """How an editing model's pipeline (`reference_images`) is given the pictures to edit, each already fitted to
        the picture of width x height it makes; none: it makes that picture from the prompt alone."""
        raise NotImplementedError(f"{cls.title} makes pictures from text alone")

    @classmethod
    def prompt_options(cls, pipe: DiffusionPipeline) -> dict[str, Any]:
        """What its pipeline must be told, beside the prompt, to read the prompt as training does."""
        return {}

    # ---- files made elsewhere -------------------------------------------------------------------
    @classmethod
    def lora_for_diffusers(
        cls, tensors: Mapping[str, torch.Tensor], pipe: DiffusionPipeline
    ) -> dict[str, torch.Tensor] | None:
        """A LoRA file's tensors in the names and scale diffusers loads onto this loaded pipeline, for the layouts
        its own loader misreads; None when `load_lora_weights` reads the file as it is. `tensors` reads each one
        from disk when asked for. Raises ValueError, saying why, for a file in such a layout that doesn't fit."""
        return None

    @classmethod
    def single_file_companions(cls, tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """For a family whose single-file checkpoints hold only the denoiser (or parts diffusers can't build a
        pipeline from): the published models (Hub ids) whose configuration, VAE and text encoders go with this
        one's denoiser, the best match first. Empty (the default) when diffusers reads the family's files whole."""
        return ()

    @classmethod
    def denoiser_from_single_file(
        cls, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The denoiser of a single-file checkpoint of a family that names `single_file_companions`: its weights in
        diffusers' names, and the config values its shapes show. Raises ValueError, saying why, for a file that
        isn't one."""
        raise NotImplementedError

    # ---- the estimate and random-weight models --------------------------------------------------
    @classmethod
    def estimate_model(cls, base_model: str, parameters_on_disk: int | None) -> tuple[str, float]:
        """Which published model the estimate sizes a run on `base_model` as, for a family that publishes several
        (Flux.2 klein 4B and 9B): its denoiser's size in `build_denoiser` and its text encoders' parameters, told
        from its name and its denoiser's parameters on disk (None where not known). Here the one "full" model."""
        return "full", cls.text_encoder_params

    @classmethod
    def build_denoiser(cls, size: str) -> torch.nn.Module:
        """A random-weight denoiser: "full" is the published architecture, "tiny" a small one with the
        same kinds of blocks, for tests and the offline demo; a family may add others (Flux's "shallow":
        the full width with a few of its blocks, which a CPU benchmark can hold)."""
        return cls.denoiser_class(**cls.denoiser_shapes[size])

    @classmethod
    def meta_inputs(cls, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        """One picture's inputs to the full-size denoiser, on the meta device (shapes without data)."""
        import torch

        side = resolution // 8
        return dict(
            sample=torch.empty(1, 4, side, side, device="meta", dtype=dtype),
            timestep=torch.zeros(1, device="meta", dtype=torch.long),
            encoder_hidden_states=torch.empty(1, 77, cls.text_width, device="meta", dtype=dtype),
        )

    @classmethod
    def checkpointed_blocks(cls) -> tuple[type[torch.nn.Module], ...]:
        """The blocks gradient checkpointing recomputes one at a time in the denoiser."""
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        return (ResnetBlock2D, BasicTransformerBlock)

    @classmethod
    def random_pipeline(
        cls, size: str, tokenizers: list[Any], text_encoders: list[torch.nn.Module], vae: torch.nn.Module
    ) -> DiffusionPipeline:
        """A pipeline of this family with random weights, from the parts tiny.py made of `random_text_encoders`
        and `random_vae` (with their tokenizers) and a random denoiser of this size made here, after them
        (torch's seed set by the caller)."""
        raise NotImplementedError
