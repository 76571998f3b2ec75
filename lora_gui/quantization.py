"""A frozen base model stored in fewer bits, so that it fits a smaller card; the LoRA trains on top of it in
full precision (QLoRA).

Only the denoiser is quantized: it is the model that stays on the GPU for the whole run (Flux.1's
transformer is 22 GiB in bf16), while the text encoders do their work once, while caching, and then wait in
CPU memory. Quantizing goes through diffusers' own `quantization_config`, as the model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_gui.errors import ConfigError

if TYPE_CHECKING:
    import torch

# In fp16, int8 weights are scaled per group of this many inputs (fewer where a layer's inputs don't divide by it):
# torchao multiplies by the raw int8 weights of a per-row layer before scaling the product, and in fp16 a sum of
# thousands of products up to 127 times an activation overflows to inf (25% of a Flux-width layer's outputs: NaN
# losses, black pictures). A grouped layer is unpacked to fp16 first, so its product is an ordinary fp16 one. bf16
# has fp32's range: the faster per-row layer stays finite there.
FP16_INT8_GROUP = 64


@dataclass(frozen=True)
class Quantization:
    name: str
    title: str  # as a sentence names it
    # Bytes one quantized weight takes, its share of the scales included (for the memory estimate).
    bytes_per_weight: float
    package: str  # the pip package that does it
    needs_cuda: bool
    single_file: bool  # whether a single-file checkpoint can be loaded quantized this way (see `quantize_loaded`)

    def weight_bytes(self, compute_dtype: torch.dtype) -> float:
        """Bytes per weight stored this way when the model computes in `compute_dtype` (unquantized: the dtype's
        own); fp16's int8 scales per group."""
        import torch

        if self.name == "none":
            return torch.finfo(compute_dtype).bits // 8
        if self.name == "int8" and compute_dtype == torch.float16:
            return self.bytes_per_weight + 4 / FP16_INT8_GROUP  # an fp32 scale per group
        return self.bytes_per_weight


QUANTIZATIONS = {
    "none": Quantization("none", "unquantized", 0.0, "", needs_cuda=False, single_file=True),
    # torchao's int8 weights, one scale per output row (per group in fp16): runs on any device, the CPU included.
    "int8": Quantization("int8", "8-bit (int8, torchao)", 1.0, "torchao", needs_cuda=False, single_file=True),
    # bitsandbytes' 4-bit NormalFloat in blocks of 64, with their scales quantized too ("double
    # quantization": 8 bits per block plus one fp32 per 256 blocks), as diffusers' Flux QLoRA write-up does.
    "nf4": Quantization(
        "nf4", "4-bit (NF4, bitsandbytes)", 0.5 + (8 / 64 + 32 / (64 * 256)) / 8, "bitsandbytes", True, False
    ),
}

# Generate's setting: a quantization, or "auto" (`for_card`'s choice for this GPU).
GENERATE_CHOICES = ("auto", *QUANTIZATIONS)


def for_card(
    denoiser_params: int, compute_dtype: torch.dtype, card_gb: float, *, on_cuda: bool, single_file: bool
) -> str:
    """The least quantization that leaves a denoiser of this size at most three quarters of the card, for
    generating: the rest is for the VAE's decoding and the denoiser's own work (Flux.1-dev: none on an 80 GB
    card, int8 on 16 and 24 GB cards, nf4 on a 12 GB one). Only what this model's format and this machine can run
    is chosen (NF4: bitsandbytes on NVIDIA GPUs, and never from a single file): where nothing fits, the least of
    those, and the pipeline then moves its parts to the GPU in turn."""
    usable = [
        (name, quantization)
        for name, quantization in QUANTIZATIONS.items()
        if (on_cuda or not quantization.needs_cuda) and (quantization.single_file or not single_file)
    ]
    for name, quantization in usable:
        if denoiser_params * quantization.weight_bytes(compute_dtype) <= 0.75 * card_gb * 2**30:
            return name
    return usable[-1][0]


def check_available(name: str, on_cuda: bool) -> None:
    """Raise ConfigError, in plain words, where this quantization can't run here."""
    quantization = QUANTIZATIONS[name]
    if quantization.needs_cuda and not on_cuda:
        raise ConfigError(
            f"quantize_base {name} ({quantization.title}) runs only on an NVIDIA GPU; on this computer choose "
            "int8 (about twice the memory of nf4) or none"
        )
    if quantization.package:
        try:
            _quiet_import(quantization.package)
        except ImportError:
            raise ConfigError(
                f"quantize_base {name} needs the {quantization.package} package: run "
                f"`pip install {quantization.package}`, or set quantize_base to none"
            ) from None


def pipeline_config(name: str, component: str, compute_dtype: torch.dtype, in_features: Iterable[int] = ()):
    """diffusers' `quantization_config` that loads `component` (the denoiser) quantized; None for "none".
    `in_features`: the widths of the denoiser's linear layers' inputs (its files tell them), which fp16's int8
    groups must divide."""
    if name == "none":
        return None
    from diffusers import BitsAndBytesConfig, TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig

    if name == "int8":
        config = TorchAoConfig(_int8_config(compute_dtype, set(in_features)))
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return PipelineQuantizationConfig(quant_mapping={component: config})


def _int8_config(compute_dtype: torch.dtype, in_features: set[int]):
    """torchao's int8 weight-only config: per output row in bf16 and fp32, in groups dividing every layer's inputs
    in fp16 (see FP16_INT8_GROUP)."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup

    if compute_dtype != torch.float16:
        return Int8WeightOnlyConfig()
    group = FP16_INT8_GROUP
    while group > 1 and any(width % group for width in in_features):
        group //= 2
    return Int8WeightOnlyConfig(granularity=PerGroup(group))


def check_single_file(name: str) -> None:
    """Raise ConfigError, before anything loads, for a quantization `quantize_loaded` can't do."""
    if not QUANTIZATIONS[name].single_file:
        raise ConfigError(
            f"quantize_base {name} can't be used with a single-file checkpoint: choose int8, or load the model "
            "from its diffusers folder or Hub id, which nf4 works with"
        )


def quantize_loaded(model: torch.nn.Module, name: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Quantize a denoiser loaded from a single-file checkpoint, in place.

    diffusers' `from_single_file` takes a `quantization_config` but treats the file's weights as already
    quantized (its quantizer's `pre_quantized` defaults to True), so torchao leaves them as they are and
    bitsandbytes asks for quantization statistics the file doesn't have. int8 is done here as diffusers' torchao
    quantizer does it for `from_pretrained`; NF4 needs bitsandbytes' layers built as the weights load, which only
    `from_pretrained` does."""
    check_single_file(name)
    if name == "none":
        return model
    import torch
    from torchao.quantization import quantize_

    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    quantize_(model, _int8_config(compute_dtype, {layer.in_features for layer in linears}))
    return model


def stored_bytes(module: torch.nn.Module) -> int:
    """The bytes a module's weights really take: a quantized tensor by what it stores (torchao's int8 data and
    scales; bitsandbytes' packed bytes), not by the dtype it computes in, which counts an int8 weight as 2 bytes."""
    return sum(_tensor_bytes(tensor) for tensor in (*module.parameters(), *module.buffers()))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass (torchao's): the tensors it is made of
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _quiet_import(package: str) -> None:
    # torchao logs at import that it lacks kernels for GPUs other than this one, which says nothing to a user.
    logging.getLogger(package).setLevel(logging.ERROR)
    __import__(package)
