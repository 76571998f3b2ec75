"""Generating images with a base model and any number of LoRAs, each at its own strength.

diffusers applies plain LoRAs (its own layout, kohya's and the others detect.py names). DoRA, LoHa and LoKr files,
ours and other tools', are applied here as each layer's weight change (kohya_layout.weight_change, computed as
ComfyUI does) added to the layer's output by a forward hook at the file's strength. Not merged into the base
weights: those stay untouched, so a strength changes by replacing hooks, a strength of 0 gives exactly the base
model's picture, and a quantized base (whose weights can't take a sum) works too. Not as diffusers adapters:
diffusers can't load LoHa or LoKr at all, and its DoRA scales the update inside the weight normalisation, so even
strength 0 changes the picture.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from lora_gui import batching, block_swap, devices, quantization
from lora_gui.adapters import canonical_modules
from lora_gui.base_models import denoiser_parameters_on_disk, family_from_files, fetch, load_pipeline
from lora_gui.downloads import PICKLE_SUFFIXES, DownloadProgress, HubToken
from lora_gui.errors import LoraFileError, LoraGuiError, OutOfMemoryError
from lora_gui.estimate import denoiser_parameters
from lora_gui.families import Family
from lora_gui.gpu_owner import GpuOwner
from lora_gui.lora_files import detect, kohya_layout
from lora_gui.lora_files.diffusers_layout import read_diffusers_lora
from lora_gui.model_policy import ANY_BASE_MODEL, BaseModelPolicy
from lora_gui.quantization import QUANTIZATIONS
from lora_gui.runs import DIFFUSERS_LORA

log = logging.getLogger(__name__)


@dataclass
class Generator:
    """A loaded base model that LoRAs can be put on and taken off, kept between generations."""

    family: type[Family]
    pipe: DiffusionPipeline
    device: torch.device
    precision: str  # "no", "fp16" or "bf16": the UNet's and text encoders' weights; the VAE stays fp32
    _hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list, repr=False)  # weight-change LoRAs

    @classmethod
    def load(
        cls,
        base_model: str,
        family: str = "auto",
        precision: str = "auto",
        quantize: str = "auto",
        *,
        token: HubToken = None,
        on_progress: Callable[[DownloadProgress], None] | None = None,
        policy: BaseModelPolicy = ANY_BASE_MODEL,
    ) -> Generator:
        """Load a base model for generating, in `precision` (a mixed-precision setting) on a GPU, with its
        denoiser quantized as `quantize` says (one of `quantization.GENERATE_CHOICES`; "auto": as little as lets it
        fit this GPU, of what its format and this machine can run). A Hub model downloads first, with `token` and
        its progress told to `on_progress` (see downloads.download)."""
        card, device = devices.card(), devices.compute_device()
        precision = devices.resolve_precision(precision)
        devices.use_tensor_cores()
        if quantize == "auto":
            # The choice needs the model's family and its own size, which its files tell once they are here: a Hub
            # model downloads first (loading it then finds its files in the download cache).
            fetch(base_model, token, on_progress, policy)
            quantize = _quantization_for_this_card(base_model, family, precision, policy)
        quantization.check_available(quantize, on_cuda=devices.has_cuda())
        loaded_family, pipe = load_pipeline(
            base_model, family, devices.DTYPES[precision], quantize, token=token, on_progress=on_progress, policy=policy
        )
        with _out_of_memory_said_plainly("loading the model"):
            if card is not None and _weight_bytes(pipe) > 0.75 * card.memory_gb * 2**30:
                # The whole model does not fit beside its work (Flux's T5 alone is 9.5 GB): each part comes to
                # the GPU when the pipeline uses it, the text encoders to read the prompt, then the denoiser.
                _swap_blocks_to_fit(loaded_family, pipe, 0.75 * card.memory_gb * 2**30, device)
                pipe.enable_model_cpu_offload(device=device)
            else:
                pipe.to(device)
        if quantize != "none":
            log.info("Generating with the %s stored %s", loaded_family.denoiser_title, QUANTIZATIONS[quantize].title)
        return cls(loaded_family, pipe, device, precision)

    def set_loras(self, loras: list[tuple[str | Path, float]], allow_pickle: bool = False) -> None:
        """Replace the active LoRAs with these (file or run folder, strength) pairs.

        Files from anywhere load: diffusers', kohya's (A1111, ComfyUI, civitai), and the LyCORIS kinds
        diffusers or this module can apply (DoRA, LoHa, LoKr). One that can't be applied raises LoraFileError
        naming its layout and why, and leaves no LoRA active.
        """
        with self._offload_hooks_set_aside():
            self._remove_weight_changes()
            self.pipe.unload_lora_weights()
            names, scales = [], []
            try:
                for index, (source, scale) in enumerate(loras):
                    if self._load_lora(resolve_lora_path(source, allow_pickle), f"lora{index}", float(scale)):
                        names.append(f"lora{index}")
                        scales.append(float(scale))
            except LoraFileError:
                self._remove_weight_changes()
                self.pipe.unload_lora_weights()
                raise
            if names:
                self.pipe.set_adapters(names, adapter_weights=scales)

    @contextlib.contextmanager
    def _offload_hooks_set_aside(self) -> Iterator[None]:
        """An offloaded pipeline's hooks taken off while LoRAs load, and put back for this generator's device:
        diffusers' loaders otherwise take them off and put them back themselves, for the first accelerator they
        find (none on a CPU, which fails; the first GPU, which may not be the one this runs on)."""
        offloaded = getattr(self.pipe.vae, "_hf_hook", None) is not None
        if offloaded:
            self.pipe.remove_all_hooks()
        try:
            yield
        finally:
            if offloaded:
                self.pipe.enable_model_cpu_offload(device=self.device)

    def _load_lora(self, path: Path, name: str, strength: float) -> bool:
        """Put one LoRA file on the model, after checking it can mean what it says: as diffusers adapter `name`
        (True), or as weight changes at `strength` (False)."""
        shapes = detect.read_shapes(path)
        layout = detect.detect_layout(list(shapes))
        if layout.problem:
            raise LoraFileError(layout.refusal(path.name))
        other_model = detect.made_for_other_model(shapes, self.pipe, self.family)
        if other_model:
            raise LoraFileError(
                f"{path.name} ({layout.name}) was made for {other_model}; this base model is {self.family.title}. "
                "Pick a LoRA made for this model, or a base model of that kind"
            )
        if layout.by_weights:
            self._add_weight_changes(path, layout, strength)
            return False
        converted = None
        try:
            # Layouts whose names diffusers' loader misreads for this model (Flux's own names, at any size) come
            # converted by the family; every other file diffusers reads itself, with its metadata.
            converted = self.family.lora_for_diffusers(detect.read_tensors(path), self.pipe)
            with warnings.catch_warnings():
                # peft warns whenever a second adapter joins a model; several LoRAs at once is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(str(path) if converted is None else converted, adapter_name=name)
        except Exception as error:  # diffusers raises many kinds; whatever it is, the file does not fit
            log.debug("Loading %s failed", path, exc_info=True)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LoraFileError(
                f"{path.name} ({layout.name}) can't be applied to this {self.family.title} model: {reason}"
            ) from None
        applied, in_file = self._adapted_layers(name), detect.count_lora_modules(list(converted or shapes))
        if applied < in_file:
            raise LoraFileError(
                f"only {applied} of the {in_file} layers in {path.name} ({layout.name}) exist in this "
                f"{self.family.title} model: it was made for another base model"
            )
        log.info("Loaded %s (%s, %d layers)", path.name, layout.name, applied)
        return True

    def _add_weight_changes(self, path: Path, layout: detect.Layout, strength: float) -> None:
        """Hook each layer a DoRA, LoHa or LoKr file adapts so that its output gains the layer's weight change."""
        if _is_diffusers_layout(path):  # ours: peft's names, its scale in the metadata, read as the kohya file says
            state, configs = read_diffusers_lora(path)
            tensors = kohya_layout.to_kohya(state, configs, self.family)
        else:
            tensors = detect.read_tensors(path)
        layers = kohya_layout.lycoris_layers(tensors)
        modules = self._modules_by_lora_name()
        missing = [layer for layer in layers if layer not in modules]
        if missing:
            raise LoraFileError(
                f"only {len(layers) - len(missing)} of the {len(layers)} layers in {path.name} ({layout.name}) exist "
                f"in this {self.family.title} model (not {missing[0]}): it was made for another base model"
            )
        if strength == 0:  # nothing to add: the base model's own picture
            return
        for layer, parts in layers.items():
            self._hooks.append(modules[layer].register_forward_hook(_WeightChange(parts, strength)))
        log.info("Loaded %s (%s, %d layers)", path.name, layout.name, len(layers))

    def _modules_by_lora_name(self) -> dict[str, torch.nn.Module]:
        """The layers of the denoiser and text encoders under every name LoRA files give them: kohya's
        (`lora_unet_down_blocks_0_...`) and diffusers' (`unet.down_blocks.0....`, as our Flux files use)."""
        prefixes = kohya_layout.kohya_prefixes(self.family)
        by_name = {}
        for component, prefix in prefixes.items():
            for name, module in canonical_modules(getattr(self.pipe, component)):
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, BaseTunerLayer)):
                    by_name[kohya_layout.kohya_name(prefix, name)] = by_name[f"{component}.{name}"] = module
        return by_name

    def _remove_weight_changes(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _adapted_layers(self, adapter: str) -> int:
        """How many layers of the UNet and text encoders carry this LoRA adapter."""
        modules = (self.family.denoiser_name, *self.family.text_encoder_names)
        return sum(
            1
            for component in modules
            for module in getattr(self.pipe, component).modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
        images: list[Image.Image] | None = None,
    ) -> Image.Image:
        """A picture; what is not given is the family's usual (its steps and guidance, its native size). `on_step`
        is told (steps done, steps in all) after each denoising step, from the thread making the picture.

        An editing model (`Family.reference_images`) edits `images` as the prompt says: each is fitted to the picture
        it makes, which without a width and height is shaped like the first (`size_for`). Without any it makes a
        picture from the prompt alone, as its pipeline does."""
        width, height, edit_options = self._pictures_to_edit(images or [], width, height)
        usual_steps, usual_guidance = self.family.generation_defaults(self.pipe)
        steps = steps or usual_steps
        guidance = usual_guidance if guidance is None else guidance
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with _out_of_memory_said_plainly("making the picture"):
            text_encoders = self.family.text_encoders(self.pipe)
            with devices.autocast(self.device, self.precision), devices.outside_autocast(*text_encoders):
                latents = self.pipe(
                    prompt=prompt,  # by name: Flux.2's pipelines take an image to edit first
                    **self.family.guidance_options(guidance, negative_prompt),
                    **self.family.prompt_options(self.pipe),
                    num_inference_steps=steps,
                    width=width,
                    height=height,
                    generator=generator,
                    output_type="latent",
                    **edit_options,
                    **_step_callback(on_step, steps),
                ).images
            return decode(self.family, self.pipe, latents, height, width)[0]

    def size_for(self, image: Image.Image, resolution: int | None = None) -> tuple[int, int]:
        """The (width, height) of an edit of `image`: its shape, as training's buckets shape a picture, at about
        resolution² pixels (the family's native resolution when not given)."""
        step = self.family.bucket_step(self.pipe)
        resolution = max(step, (resolution or self.family.default_resolution) // step * step)
        return batching.nearest_bucket(image.size, batching.bucket_sizes(resolution, step))

    def _pictures_to_edit(
        self, images: list[Image.Image], width: int | None, height: int | None
    ) -> tuple[int, int, dict[str, Any]]:
        """The size of the picture to make, and what tells the pipeline the pictures to edit, each fitted to that
        size (covering it, centre-cropped) as training fits a "before" picture to its pair's bucket."""
        takes = self.family.reference_images
        if not images:
            width, height = width or self.family.default_resolution, height or self.family.default_resolution
            # An editing model's pipeline is told the size even so: it may size its pictures by a rule of its own.
            return width, height, self.family.reference_options(self.pipe, [], width, height) if takes else {}
        if not takes:
            raise LoraGuiError(
                f"{self.family.title} makes pictures from text alone: it can't edit a picture. Leave the picture out, "
                "or pick an editing model"
            )
        if len(images) > takes:
            raise LoraGuiError(
                f"{self.family.title} edits {takes} picture{'s' if takes > 1 else ''} at a time, not {len(images)}"
            )
        aspect = images[0].width / images[0].height
        if width and not height:
            height = round(width / aspect)
        elif height and not width:
            width = round(height * aspect)
        elif not width:
            width, height = self.size_for(images[0])
        # Sides the VAE and the patches divide, so the picture to edit and the picture made line up exactly.
        step = self.family.bucket_step(self.pipe)
        width, height = max(step, round(width / step) * step), max(step, round(height / step) * step)
        fitted = [batching.fit_to_bucket(image.convert("RGB"), (width, height))[0] for image in images]
        return width, height, self.family.reference_options(self.pipe, fitted, width, height)


def _step_callback(on_step: Callable[[int, int], None] | None, steps: int) -> dict[str, Any]:
    """The pipeline's per-step callback (diffusers' `callback_on_step_end`) telling `on_step` how far it got."""
    if on_step is None:
        return {}

    def step_ended(pipe: DiffusionPipeline, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        # The steps the pipeline takes: a few schedulers (PNDM's, the tiny models') take one more than asked.
        total = getattr(pipe, "num_timesteps", None) or steps
        on_step(min(index + 1, total), total)
        return tensors  # unchanged: the pipeline goes on with its own latents

    return {"callback_on_step_end": step_ended}


class _WeightChange:
    """A forward hook that adds one layer's weight change, times a strength, to the layer's output.

    The change is computed again in every call, from the file's small factors (and the base weight, for DoRA):
    holding it whole would take as much memory as the layers it adapts."""

    def __init__(self, parts: dict[str, torch.Tensor], strength: float):
        self.parts, self.strength = parts, strength

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        weight = _dense_weight(layer)
        if any(part.device != weight.device for part in self.parts.values()):  # a model moved to the GPU
            self.parts = {name: part.to(weight.device) for name, part in self.parts.items()}
        change = (kohya_layout.weight_change(self.parts, weight) * self.strength).to(output.dtype)
        x = args[0].to(output.dtype)
        if isinstance(layer, torch.nn.Conv2d):
            return output + F.conv2d(x, change, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return output + F.linear(x, change)


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as plain numbers in its true shape, also where the base is quantized (quantization.py)."""
    weight = layer.weight
    if hasattr(weight, "quant_state"):  # bitsandbytes' NF4 keeps its packed bytes in another shape
        import bitsandbytes.functional

        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.dequantize()  # torchao's int8 tensors unpacked; a plain tensor as it is


def _is_diffusers_layout(path: Path) -> bool:
    """Whether a file is in diffusers' layout as `save_lora_weights` writes it, its adapters' configs within."""
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return LORA_ADAPTER_METADATA_KEY in (handle.metadata() or {})


def _quantization_for_this_card(base_model: str, family: str, precision: str, policy: BaseModelPolicy) -> str:
    """On a GPU, the least quantization that lets the base model's denoiser fit it, sized by the model's own files
    (its family's published size where they can't tell); none on a CPU, or for a model whose family can't be told
    before loading it."""
    card = devices.card()
    family = family if family != "auto" else family_from_files(base_model, policy)
    if card is None or family is None:
        return "none"
    parameters = denoiser_parameters_on_disk(base_model, policy) or denoiser_parameters(family)
    single_file = policy.looks_on_disk(base_model) and Path(base_model.strip()).expanduser().is_file()
    return quantization.for_card(
        parameters, devices.DTYPES[precision], card.memory_gb, on_cuda=devices.has_cuda(), single_file=single_file
    )


@torch.no_grad()
def decode(
    family: type[Family], pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int
) -> list[Image.Image]:
    """Pictures from a pipeline's latents, decoded by its VAE in the VAE's fp32 and outside any autocast.

    On a GPU the denoiser runs in bf16 or fp16, and diffusers hands its latents to the fp32 VAE in that
    dtype (it casts them only on Apple's MPS): the decode fails, or under autocast runs in fp16, where
    SDXL's VAE overflows into black pictures. So the pipelines stop at the latents (output_type
    "latent"), and this undoes their scaling exactly as they would and decodes in full precision, as
    diffusers' training scripts do for their validation images."""
    vae = pipe.vae
    latents = family.latents_for_vae(pipe, latents.float(), height, width).to(execution_device(vae), vae.dtype)
    with torch.autocast(vae.device.type, enabled=False):
        images = vae.decode(latents, return_dict=False)[0]
    if images.ndim == 5:  # a video VAE's pictures (B, 3, frames, H, W): the one frame
        images = images[:, :, 0]
    if getattr(pipe, "watermark", None) is not None:  # SDXL's invisible watermark, when its package is installed
        images = pipe.watermark.apply_watermark(images)
    return pipe.image_processor.postprocess(images, output_type="pil")


def _swap_blocks_to_fit(family: type[Family], pipe: DiffusionPipeline, budget: float, device: torch.device) -> None:
    """Where the denoiser alone, quantized as it is, takes more than `budget` bytes, as few of its blocks as let it
    fit stream through the GPU (block_swap.py). It still takes its turn on the GPU with the pipeline's other parts
    (diffusers' offload moves it whole, and block swap keeps the swapped blocks out of every move): never beside the
    text encoders, which for the largest models are as large as the GPU's share of it."""
    denoiser = family.denoiser(pipe)
    if not family.swap_blocks or quantization.stored_bytes(denoiser) <= budget:
        return
    denoiser.requires_grad_(False)  # nothing here trains: every weight it has now is the frozen base's
    count = block_swap.count_for_budget(denoiser, family.swap_blocks, budget)
    if block_swap.swap_blocks(denoiser, family.swap_blocks, count, device) is not None:
        log.info("Generating with %d of the %s's blocks swapped", count, family.denoiser_title)


def _weight_bytes(pipe: DiffusionPipeline) -> int:
    """What the pipeline's weights take, quantized ones by what they store."""
    parts = [part for part in pipe.components.values() if isinstance(part, torch.nn.Module)]
    return sum(quantization.stored_bytes(part) for part in parts)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: where diffusers' CPU-offload hook will move it (it waits in CPU memory until then,
    and the hook moves the module, not its inputs), else where its weights are."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(hook_device) if hook_device is not None else module.device


@contextlib.contextmanager
def _out_of_memory_said_plainly(doing: str) -> Iterator[None]:
    """Generation shares the GPU with any training run: running out of memory is a message, not a crash."""
    try:
        yield
    except Exception as error:
        if not devices.is_out_of_memory(error):
            raise
        raise OutOfMemoryError(
            f"the GPU ran out of memory while {doing}. If a training run is going, it needs that memory: "
            "generate after it finishes (or stop it), or make smaller pictures"
        ) from None
    finally:
        devices.free_memory()


class GeneratorCache:
    """The last base model loaded for generating, kept so the next click does not load it again.

    Training runs and captioning have the GPU first (`gpu`, gpu_owner.py). Before either starts, `release` waits
    for a picture being made and frees the model (an SDXL pipeline is 7 GB, which a 12 GB card's run needs); while
    either holds a GPU, `use` refuses to load one beside it, since any of them could then run out of memory."""

    def __init__(self, gpu: GpuOwner | None = None, policy: BaseModelPolicy = ANY_BASE_MODEL):
        self._gpu = gpu or GpuOwner()
        self._gpu.generate_steps_aside = self.release
        self.policy = policy  # which base models may be loaded (a Space: Hub ids only)
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[str, str], Generator] | None = None  # (base model, quantization asked for)

    @property
    def model(self) -> str | None:
        """The base model loaded now, if any."""
        return self._loaded[0][0] if self._loaded else None

    @contextlib.contextmanager
    def use(
        self,
        base_model: str,
        quantize: str = "auto",
        *,
        token: HubToken = None,
        on_progress: Callable[[DownloadProgress], None] | None = None,
    ) -> Iterator[Generator]:
        """The loaded model for `base_model` with its denoiser quantized as `quantize` says, held for the block: a
        run waits for it to end before starting. Loading it first downloads it (see `Generator.load`)."""
        with self._lock:
            refusal = self._gpu.claim_for_generate()
            if refusal is not None:
                raise LoraGuiError(refusal)
            if self._loaded is None or self._loaded[0] != (base_model, quantize):
                self._loaded = None  # free the old model before loading the next
                devices.free_memory()
                generator = Generator.load(
                    base_model, quantize=quantize, token=token, on_progress=on_progress, policy=self.policy
                )
                self._loaded = ((base_model, quantize), generator)
            yield self._loaded[1]

    def release(self) -> str | None:
        """Free the loaded model, once no picture is being made; says so if there was one. How Generate steps aside
        when a run or captioning takes the GPU (gpu_owner.py)."""
        with self._lock:
            self._gpu.generate_stepped_aside()
            if self._loaded is None:
                return None
            self._loaded = None
            devices.free_memory()
        return "The model the Generate tab had loaded was unloaded, so this run has the memory to itself"


def resolve_lora_path(source: str | Path, allow_pickle: bool = False) -> Path:
    """The LoRA file for a path that may be a file or a run folder; refuses pickles unless allowed."""
    path = Path(source).expanduser()
    if path.is_dir():
        candidate = path / DIFFUSERS_LORA
        if not candidate.is_file():
            raise LoraFileError(f"{path} holds no {DIFFUSERS_LORA}: has its training finished?")
        return candidate
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise LoraFileError(
            f"{path.name} is a pickled file, which can run any code on this computer when loaded. "
            "Use a .safetensors LoRA, or allow pickled files only if you trust where it came from"
        )
    if path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
        raise LoraFileError(f"{path.name} is not a LoRA file (expected .safetensors)")
    return path
