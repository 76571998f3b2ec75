"""The ways to train in less GPU memory: one entry each, in the one order they are tried and advised.

Least harmful first. Suggest settings tries them in this order until the estimate fits the card (`to_try`); a run
that ran out of memory names those left to do (`tips`); the Train tab, where the estimate is over the card, names
those that lower the phase needing the most (`form_tips`). The estimate (estimate.py) counts what each saves from
the setting it changes. No torch here: the app reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_gui.config import TrainConfig
from lora_gui.optimizers import OPTIMIZERS

# The estimate's phases a saver lowers (Estimate.training_gb, Estimate.previews_gb).
TRAINING, PREVIEWS = "training", "previews"
# Advice names a lower resolution only above this; Suggest settings, which sees the model, goes down to half its own
# size (256 px at least) where the card needs it.
ADVISED_RESOLUTION = 512


@dataclass(frozen=True)
class Saver:
    """One way to save memory: the setting it changes, and when and how it is advised and tried."""

    setting: str
    applies: Callable[[TrainConfig], bool]  # whether it has something left to save with these settings
    advice: Callable[[TrainConfig], str]  # in the settings' own names: the out-of-memory message
    form_advice: Callable[[TrainConfig], str]  # the same in the Train tab's labels
    lowers: tuple[str, ...]  # the estimate's phases it makes much smaller
    # Suggest settings' values to try, least harmful first, each with what it costs; from the settings, the model's
    # own resolution and whether the card is an NVIDIA GPU (bitsandbytes' 8-bit AdamW and NF4 need one).
    tries: Callable[[TrainConfig, int, bool], list[tuple[Any, str]]] = lambda config, native, nvidia: []


def _fewer_bits(config: TrainConfig) -> str:
    return "nf4" if config.quantize_base == "int8" else "int8 or nf4"


def _or_8_bit(config: TrainConfig, name: str) -> str:
    # Adafactor keeps almost nothing per weight; 8-bit AdamW a quarter of AdamW's, and only on NVIDIA GPUs.
    return "" if OPTIMIZERS[config.optimizer].state_bytes <= 2 else f" or {name}"


def _smaller_batches(config: TrainConfig, native: int, nvidia: bool) -> list[tuple[Any, str]]:
    return [(size, "slower per picture") for size in (2, 1) if size < config.batch_size]


def _quantized(config: TrainConfig, native: int, nvidia: bool) -> list[tuple[Any, str]]:
    # Before a lower resolution: 8-bit frozen weights cost little (QLoRA), training under the model's own size
    # costs detail.
    tries: list[tuple[Any, str]] = [("int8", "the frozen weights in 8 bits, a little less exact")]
    return tries + ([("nf4", "the frozen weights in 4 bits, less exact")] if nvidia else [])


def _lower_resolutions(config: TrainConfig, native: int, nvidia: bool) -> list[tuple[Any, str]]:
    floor = max(256, native // 2)
    return [(size, "less detail") for size in range(config.resolution - 128, floor - 1, -128)]


SAVERS = (
    Saver(
        "gradient_checkpointing",
        applies=lambda config: not config.gradient_checkpointing,
        advice=lambda config: "turn on gradient checkpointing",
        form_advice=lambda config: "turn on Gradient checkpointing (under Advanced)",
        lowers=(TRAINING,),
        tries=lambda config, native, nvidia: [(True, "about 30% slower")],
    ),
    Saver(
        "optimizer",
        applies=lambda config: config.optimizer != "adafactor",
        advice=lambda config: f"use the adafactor optimizer{_or_8_bit(config, '8-bit AdamW')}",
        form_advice=lambda config: f"set Optimizer to adafactor{_or_8_bit(config, 'adamw8bit')}",
        lowers=(TRAINING,),
        tries=lambda config, native, nvidia: [
            ("adamw8bit" if nvidia else "adafactor", "its state in fewer bytes, about as good")
        ],
    ),
    Saver(
        "batch_size",
        applies=lambda config: config.batch_size > 1,
        advice=lambda config: f"lower the batch size (now {config.batch_size}) and raise gradient accumulation instead",
        form_advice=lambda config: "lower Batch size",
        lowers=(TRAINING,),
        tries=_smaller_batches,
    ),
    Saver(
        "quantize_base",
        applies=lambda config: config.quantize_base != "nf4",
        advice=lambda config: f"store the base model in fewer bits (quantize_base {_fewer_bits(config)})",
        form_advice=lambda config: f"set Quantize base to {_fewer_bits(config)}",
        lowers=(TRAINING, PREVIEWS),
        tries=_quantized,
    ),
    Saver(
        "resolution",
        applies=lambda config: config.resolution > ADVISED_RESOLUTION,
        advice=lambda config: f"lower the resolution (now {config.resolution})",
        form_advice=lambda config: "lower Resolution",
        lowers=(TRAINING, PREVIEWS),
        tries=_lower_resolutions,
    ),
    # The last two change what the LoRA learns: advised, never tried by Suggest settings.
    Saver(
        "train_text_encoder",
        applies=lambda config: config.train_text_encoder,
        advice=lambda config: "stop training the text encoder",
        form_advice=lambda config: "turn off Train text encoder",
        lowers=(TRAINING, PREVIEWS),
    ),
    Saver(
        "rank",
        applies=lambda config: config.rank > 16,
        advice=lambda config: f"lower the rank (now {config.rank})",
        form_advice=lambda config: "lower Rank",
        lowers=(TRAINING,),
    ),
)


def tips(config: TrainConfig) -> list[str]:
    """What is left to change, in the settings' own names: for the out-of-memory message."""
    return [saver.advice(config) for saver in SAVERS if saver.applies(config)]


def form_tips(config: TrainConfig, phase: str) -> list[str]:
    """What is left to change to lower the estimate's `phase`, in the Train tab's labels."""
    return [saver.form_advice(config) for saver in SAVERS if phase in saver.lowers and saver.applies(config)]


def to_try(config: TrainConfig, native_resolution: int, nvidia: bool) -> list[tuple[str, Any, str]]:
    """Every (setting, value, what it costs) Suggest settings tries, in order."""
    return [
        (saver.setting, value, cost)
        for saver in SAVERS
        for value, cost in saver.tries(config, native_resolution, nvidia)
    ]
