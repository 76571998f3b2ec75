"""A frozen base model stored in fewer bits, so that it fits a smaller card; the LoRA trains on top of it in
full precision (QLoRA).

Only the denoiser is quantized: it is the model that stays on the GPU for the whole run (Flux.1's
transformer is 22 GiB in bf16), while the text encoders do their work once, while caching, and then wait in
CPU memory. Quantizing goes through diffusers' own `quantization_config`, as the model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lora_gui.errors import ConfigError


@dataclass(frozen=True)
class Quantization:
    name: str
    title: str  # as a sentence names it
    # Bytes one quantized weight takes, its share of the scales included (for the memory estimate).
    bytes_per_weight: float
    package: str  # the pip package that does it
    needs_cuda: bool


QUANTIZATIONS = {
    "none": Quantization("none", "unquantized", 0.0, "", needs_cuda=False),
    # torchao's int8 weights, one scale per output row: runs on any device, the CPU included.
    "int8": Quantization("int8", "8-bit (int8, torchao)", 1.0, "torchao", needs_cuda=False),
    # bitsandbytes' 4-bit NormalFloat in blocks of 64, with their scales quantized too ("double
    # quantization": 8 bits per block plus one fp32 per 256 blocks), as diffusers' Flux QLoRA write-up does.
    "nf4": Quantization("nf4", "4-bit (NF4, bitsandbytes)", 0.5 + (8 / 64 + 32 / (64 * 256)) / 8, "bitsandbytes", True),
}


def for_card(denoiser_params: int, weight_bytes: int, card_gb: float) -> str:
    """The least quantization that leaves a denoiser of this size at most three quarters of the card, for
    generating: the rest is for the VAE's decoding and the denoiser's own work (Flux.1-dev: none on an 80 GB
    card, int8 on 16 and 24 GB cards, nf4 on a 12 GB one)."""
    for name, quantization in QUANTIZATIONS.items():
        per_weight = quantization.bytes_per_weight or weight_bytes
        if denoiser_params * per_weight <= 0.75 * card_gb * 2**30:
            return name
    return "nf4"


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


def pipeline_config(name: str, component: str, compute_dtype: torch.dtype):
    """diffusers' `quantization_config` that loads `component` (the denoiser) quantized; None for "none"."""
    if name == "none":
        return None
    from diffusers import BitsAndBytesConfig, TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig

    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return PipelineQuantizationConfig(quant_mapping={component: config})


def check_single_file(name: str) -> None:
    """Raise ConfigError, before anything loads, for a quantization `quantize_loaded` can't do."""
    if name not in ("none", "int8"):
        raise ConfigError(
            f"quantize_base {name} can't be used with a single-file checkpoint: choose int8, or load the model "
            "from its diffusers folder or Hub id, which nf4 works with"
        )


def quantize_loaded(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Quantize a denoiser loaded from a single-file checkpoint, in place.

    diffusers' `from_single_file` takes a `quantization_config` but treats the file's weights as already
    quantized (its quantizer's `pre_quantized` defaults to True), so torchao leaves them as they are and
    bitsandbytes asks for quantization statistics the file doesn't have. int8 is done here as diffusers' torchao
    quantizer does it for `from_pretrained`; NF4 needs bitsandbytes' layers built as the weights load, which only
    `from_pretrained` does."""
    check_single_file(name)
    if name == "none":
        return model
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def _quiet_import(package: str) -> None:
    # torchao logs at import that it lacks kernels for GPUs other than this one, which says nothing to a user.
    logging.getLogger(package).setLevel(logging.ERROR)
    __import__(package)
