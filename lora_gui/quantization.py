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


def model_config(name: str, compute_dtype: torch.dtype):
    """The same, for loading the denoiser alone (from a single-file checkpoint)."""
    config = pipeline_config(name, "model", compute_dtype)
    return None if config is None else config.quant_mapping["model"]


def _quiet_import(package: str) -> None:
    # torchao logs at import that it lacks kernels for GPUs other than this one, which says nothing to a user.
    logging.getLogger(package).setLevel(logging.ERROR)
    __import__(package)
