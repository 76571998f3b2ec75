"""The LoRA adapters a run trains: added to the base model through peft, found again, and put back on resume.

One place builds the adapters' peft config (`lora_config`, from the kind's entry in adapter_kinds.py), so training,
the estimate and the benchmark adapt the same layers the same way. The kinds (TrainConfig.lora_type) are peft's
own: LoRA, DoRA (LoraConfig's use_dora: a LoRA plus each output row's learned length, `lora_magnitude_vector`),
LyCORIS' LoHa (LoHaConfig: the Hadamard product of two low-rank products) and LoKr (LoKrConfig: a Kronecker product,
its second factor low-rank when the rank is small against the layer). Every kind starts at exactly the base model's
output.

transformers 5 dropped the `text_model.` level from CLIP's module names, while diffusers and every
other tool expect it: state dicts leave here with the canonical names, whatever the installed
transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import peft
import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from lora_gui.adapter_kinds import ADAPTER_KINDS
from lora_gui.config import TrainConfig
from lora_gui.errors import ConfigError
from lora_gui.families import Family

CANONICAL_TEXT_PREFIX = "text_model."


def lora_config(rank: int, alpha: float, target_modules: Sequence[str], lora_type: str = "lora") -> PeftConfig:
    """An adapter of this kind and rank on every layer `target_modules` names, its update scaled by alpha / rank.

    One factor of each starts at zero (as peft initialises them: LoRA's B, LoHa's w2_b, LoKr's w1), so training starts
    from exactly the base model's output."""
    kind = ADAPTER_KINDS.get(lora_type)
    if kind is None:
        raise ConfigError(f"lora_type {lora_type!r} is none of {', '.join(ADAPTER_KINDS)}")
    arguments = {"r": rank, kind.alpha_argument: alpha, "target_modules": list(target_modules), **kind.peft_arguments}
    return getattr(peft, kind.peft_class)(**arguments)


def add_lora(pipe: DiffusionPipeline, family: type[Family], config: TrainConfig) -> list[dict]:
    """Put the run's adapters on the denoiser (and text encoders); return the optimizer's parameter groups.

    The adapters train in fp32 whatever the base's dtype; text encoders get their own learning rate."""
    denoiser, targets = family.denoiser(pipe), family.lora_targets(config.target_modules)
    try:
        denoiser.add_adapter(lora_config(config.rank, config.lora_alpha, targets, config.lora_type))
    except ValueError as error:
        raise ConfigError(f"target_modules {targets} match no layer of the model ({error})") from None
    cast_training_params(denoiser, dtype=torch.float32)
    groups = [{"params": _trainable(denoiser), "lr": config.learning_rate}]
    if config.train_text_encoder:
        if not family.trains_text_encoders:
            raise ConfigError(
                f"{family.title} LoRAs here train its {family.denoiser_title} alone: turn off train_text_encoder"
            )
        text_config = lora_config(config.rank, config.lora_alpha, config.text_encoder_target_modules, config.lora_type)
        for encoder in family.text_encoders(pipe):
            # transformers 5's add_adapter demands an unreleased peft; peft injects directly.
            inject_adapter_in_model(text_config, encoder, adapter_name="default")
            encoder.peft_config = {"default": text_config}
            cast_training_params(encoder, dtype=torch.float32)
            rate = config.text_encoder_learning_rate or config.learning_rate
            groups.append({"params": _trainable(encoder), "lr": rate})
    return groups


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in module.parameters() if param.requires_grad]


def trained_modules(pipe: DiffusionPipeline, family: type[Family]) -> dict[str, torch.nn.Module]:
    """Pipeline component name -> module, for each component that carries a LoRA."""
    names = (family.denoiser_name, *family.text_encoder_names)
    return {name: getattr(pipe, name) for name in names if getattr(getattr(pipe, name), "peft_config", None)}


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of one module, under canonical module names, each tensor contiguous.

    Every LoRA file (both layouts, checkpoints, the -best file) is written from here, and safetensors refuses a
    non-contiguous tensor: a conv layer's LoRA weights are, on a denoiser made channels-last."""
    state = {key: value.contiguous() for key, value in get_peft_model_state_dict(module).items()}
    if _needs_text_prefix(module):
        state = {CANONICAL_TEXT_PREFIX + key: value for key, value in state.items()}
    return state


def canonical_modules(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every layer of a pipeline component under its canonical name (a CLIP's with `text_model.`)."""
    prefix = CANONICAL_TEXT_PREFIX if _needs_text_prefix(module) else ""
    for name, layer in module.named_modules():
        if name:
            yield prefix + name, layer


def load_trained_lora(source: Path, pipe: DiffusionPipeline, family: type[Family]) -> None:
    """Put weights of a diffusers-layout file written from these adapters back into them (resume)."""
    saved = load_file(str(source))
    for name, module in trained_modules(pipe, family).items():
        prefix = f"{name}."
        state = {key[len(prefix) :]: value for key, value in saved.items() if key.startswith(prefix)}
        if _needs_text_prefix(module):
            state = {key.removeprefix(CANONICAL_TEXT_PREFIX): value for key, value in state.items()}
        result = set_peft_model_state_dict(module, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint LoRA does not fit the {name}: {unexpected[:3]}")


def _needs_text_prefix(module: torch.nn.Module) -> bool:
    """True for a transformers-5 CLIP, whose module names lack the canonical `text_model.` level."""
    return hasattr(module, "config") and not hasattr(module, "text_model") and hasattr(module, "encoder")
