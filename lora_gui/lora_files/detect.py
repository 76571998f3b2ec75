"""Which layout a LoRA file made elsewhere is in, and whether diffusers can apply it here.

Told from tensor names alone (nothing is loaded): diffusers/peft (`lora_A`), diffusers' older
attention-processor layout (`to_q_lora.down`, `lora.down`, `lora_linear_layer`), kohya
(`lora_unet_*` / `lora_te*_` with `lora_down`/`lora_up`/`alpha`, as A1111, Forge, ComfyUI and civitai
use), ComfyUI's (`lora_down`/`lora_up` under `diffusion_model.`), and the LyCORIS kinds, named by their tensor
suffixes as in ComfyUI's comfy/weight_adapter/ and A1111's network_*.py. diffusers applies the first four, some
through the family's own reading of their names (LyCORIS LoCon is plain kohya LoRA on more layers). DoRA, LoHa and
LoKr, in kohya's names or peft's (`dora_scale` / `lora_magnitude_vector`, `hada_*`, `lokr_*`), Generate applies
itself (`Layout.by_weights`: each layer's weight change, see kohya_layout.weight_change); for the other LyCORIS kinds
the error says what the file is and where it does work.

A file's base model is told from the width of the text features its cross-attention layers read
(768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL), from weights for a second text encoder (SDXL), and from the
kind of denoiser its layers belong to (a UNet's, or a transformer's as in Flux).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from lora_gui.adapter_kinds import ADAPTER_KINDS
from lora_gui.base_models import TensorFile
from lora_gui.downloads import PICKLE_SUFFIXES
from lora_gui.errors import LoraFileError
from lora_gui.families import REGISTRY, Family, family_of_lora

ELSEWHERE = "it works in AUTOMATIC1111, Forge and ComfyUI"
# Tensor-name ending -> kind, for the kinds Generate applies as weight changes, checked in order: LyCORIS' own kinds
# first, as their files may carry DoRA's lengths too (LyCORIS' dora_wd).
_BY_WEIGHTS = tuple(
    (re.compile(kind.marker + "$"), kind.long_title)
    for kind in sorted(ADAPTER_KINDS.values(), key=lambda kind: not kind.lycoris)
    if kind.marker
)
# Tensor-name ending -> (kind, what diffusers lacks), checked in order.
_LYCORIS = tuple(
    (re.compile(pattern + "$"), name, problem)
    for pattern, name, problem in (
        (r"\.lora_mid\.weight", "LyCORIS LoCon with Tucker decomposition", "diffusers can't apply lora_mid weights"),
        (r"\.(oft_blocks|oft_diag|oft_R\.weight)", "LyCORIS OFT", "diffusers can't apply OFT weights"),
        (r"\.a1\.weight", "LyCORIS GLoRA", "diffusers can't apply GLoRA weights"),
        (r"\.on_input", "LyCORIS (IA)³", "diffusers can't apply (IA)³ weights"),
        (r"\.(w_norm|b_norm)", "LyCORIS norm", "diffusers can't apply weights for normalization layers"),
        (r"\.diff(_b)?", "LyCORIS full (weight difference)", "diffusers can't apply whole-weight differences"),
    )
)
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")  # te3: T5, for SD3 and Flux
_DOWN = re.compile(r"(lora_A|lora_down|lora[._]down|lora_linear_layer\.down)(\.default)?\.weight$")
_CROSS_ATTENTION_KEY = re.compile(r"attn2[._](processor[._])?to_k[._]")
# Layers by which a file shows the kind of denoiser it adapts, in diffusers', kohya's, ai-toolkit's and Black Forest
# Labs' names.
_TRANSFORMER_KEY = re.compile(
    r"^(transformer\.|lora_transformer_|(model\.)?diffusion_model\.(single_)?transformer_blocks\.)"
    r"|double_blocks|single_blocks"
)
_UNET_KEY = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]")


UNKNOWN = "unknown"


@dataclass(frozen=True)
class Layout:
    name: str
    problem: str = ""  # why it can't be applied here; empty when it can
    by_weights: bool = False  # applied by Generate as each layer's weight change, not by diffusers

    def refusal(self, file_name: str) -> str:
        """Why a file in this layout can't be used, as a sentence for a person."""
        if self.name == UNKNOWN:
            return f"{file_name} is not a LoRA file this app can read: {self.problem}"
        article = "an" if self.name[:1].lower() in "aeiou" else "a"
        return f"{file_name} is {article} {self.name} file, which can't be used here: {self.problem}"


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a LoRA file; a .safetensors file's header only."""
    try:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            # Only reached once the user allowed pickles; weights_only refuses code all the same.
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise TypeError("it holds no named tensors")
            return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except Exception as error:
        raise LoraFileError(f"{path.name} can't be read as a LoRA file ({type(error).__name__}: {error})") from None


def read_tensors(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a LoRA file that `read_shapes` read, by name; a .safetensors file's each read when asked for."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return torch.load(path, map_location="cpu", weights_only=True)
    return TensorFile(path)


def detect_layout(keys: list[str]) -> Layout:
    """The layout of a LoRA file from its tensor names, and what stands in the way of applying it."""
    if not keys:
        return Layout("empty file", "it holds no tensors")
    for pattern, name in _BY_WEIGHTS:
        if any(pattern.search(key) for key in keys):
            return Layout(name, by_weights=True)
    for pattern, name, problem in _LYCORIS:
        if any(pattern.search(key) for key in keys):
            return Layout(name, f"{problem}; {ELSEWHERE}")
    if any(key.startswith("lycoris_") for key in keys):
        return Layout("LyCORIS (SimpleTuner)", f"diffusers can't apply lycoris_ weights; {ELSEWHERE}")
    if all(key.startswith(_KOHYA_PREFIXES) for key in keys):
        return Layout("kohya (A1111 / ComfyUI)")
    if any(".lora_A." in key for key in keys):
        return Layout("diffusers (peft)")
    if any(".lora.down." in key or "_lora.down." in key or ".lora_linear_layer." in key for key in keys):
        return Layout("diffusers (attention-processor, older)")
    if any(key.endswith(".lora_down.weight") for key in keys):
        return Layout("ComfyUI")
    if any(key.startswith(("model.diffusion_model.", "first_stage_model.")) for key in keys):
        return Layout("full model checkpoint", "it is a whole model, not a LoRA: choose it as the base model")
    if len(keys) <= 2 and any(key in ("emb_params", "string_to_param", "clip_l", "clip_g") for key in keys):
        return Layout("textual-inversion embedding", "it is an embedding, not a LoRA; use it in the prompt elsewhere")
    example = sorted(keys)[0]
    return Layout(
        UNKNOWN,
        f"its tensor names (such as {example}) fit none of the layouts it reads (diffusers', kohya's, FluxGym's, "
        "ai-toolkit's, ComfyUI's and LyCORIS')",
    )


def made_for_other_model(shapes: dict[str, tuple[int, ...]], pipe: DiffusionPipeline, family: type[Family]) -> str:
    """What base model the file was made for, when that is not this one; "" when it fits or can't be told."""
    second_encoder = [key for key in shapes if key.startswith(("lora_te2_", "text_encoder_2."))]
    if second_encoder and not hasattr(pipe, "text_encoder_2"):
        return f"{family_of_lora(second_encoder).title} (it has weights for a second text encoder)"
    denoiser = "transformer" if any(_TRANSFORMER_KEY.search(key) for key in shapes) else "unet"
    if denoiser == "unet" != family.denoiser_name and any(_UNET_KEY.search(key) for key in shapes):
        return "Stable Diffusion (it adapts a UNet's layers)"
    if denoiser == "transformer" != family.denoiser_name:
        transformers = [other.title for other in REGISTRY.values() if other.denoiser_name == "transformer"]
        return f"a transformer model ({', '.join(transformers)}, or another such as SD3)"
    expected = family.cross_attention_width(pipe)
    by_width: dict[int, str] = {}  # families whose text features are as wide (the same text encoder) named together
    for other in REGISTRY.values():
        by_width[other.text_width] = (
            f"{by_width[other.text_width]} or {other.title}" if other.text_width in by_width else other.title
        )
    for key, shape in shapes.items():
        if _CROSS_ATTENTION_KEY.search(key) and _DOWN.search(key) and len(shape) >= 2 and shape[1] != expected:
            width = shape[1]
            return by_width.get(width, f"a model whose text features are {width} wide (here: {expected})")
    return ""


def count_lora_modules(keys: list[str]) -> int:
    """How many layers a LoRA file adapts: one down (lora_A) weight each, in every supported layout."""
    return sum(1 for key in keys if _DOWN.search(key))
