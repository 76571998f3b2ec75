"""The ways to train in less GPU memory: one entry each, in the one order they are tried and advised.

Least harmful first. Suggest settings tries them in this order until the estimate fits the card (`Saver.tries`, each
from the settings the savers before it left); a run that ran out of memory names those left to do (`tips`); the Train
tab, where the estimate is over the card, names those that lower the phase needing the most (`form_tips`). The
estimate (estimate.py) counts what each saves from the setting it changes. No torch here: the app reads it.

Block swap comes after everything that costs little (an 8-bit optimizer, smaller batches, a base in fewer bits) and is
advised only once they are used: it costs speed on every step. It comes before a lower resolution: training under the
model's own size costs detail for good, while block swap changes nothing the LoRA learns, and at the model's own
resolution each block computes long enough to hide most of the next one's copy (at a lower one, less of it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_gui.config import TrainConfig
from lora_gui.families import get_family
from lora_gui.optimizers import OPTIMIZERS

# The estimate's phases a saver lowers (Estimate.training_gb, Estimate.previews_gb).
TRAINING, PREVIEWS = "training", "previews"
# Advice names a lower resolution only above this; Suggest settings, which sees the model, goes down to half its own
# size (256 px at least) where the card needs it.
ADVISED_RESOLUTION = 512
SWAP_LABEL = "Blocks kept in the computer's memory (block swap)"  # the Train tab's label for blocks_to_swap


@dataclass(frozen=True)
class Situation:
    """What Suggest settings' tries depend on beside the settings."""

    native_resolution: int  # the model's own
    nvidia: bool  # whether the card is an NVIDIA GPU: bitsandbytes' 8-bit AdamW and NF4 need one
    blocks: Callable[[], int]  # the denoiser's blocks that can swap, 0 where none can (counted only when asked)
    fits: Callable[[TrainConfig], bool]  # whether settings fit the card by the estimate


@dataclass(frozen=True)
class Saver:
    """One way to save memory: the setting it changes, and when and how it is advised and tried."""

    setting: str
    applies: Callable[[TrainConfig], bool]  # whether it has something left to save with these settings
    advice: Callable[[TrainConfig], str]  # in the settings' own names: the out-of-memory message
    form_advice: Callable[[TrainConfig], str]  # the same in the Train tab's labels
    lowers: tuple[str, ...]  # the estimate's phases it makes much smaller
    # Suggest settings' values to try, least harmful first, each with what it costs.
    tries: Callable[[TrainConfig, Situation], list[tuple[Any, str]]] = lambda config, situation: []
    # Only for a family whose blocks swap; advised only once every saver before it is used (its cost is speed on
    # every step, which theirs is not).
    swaps_blocks: bool = False
    # Whether what Suggest settings tries is in place already, where `applies` still advises more.
    used: Callable[[TrainConfig], bool] = lambda config: False


def _fewer_bits(config: TrainConfig) -> str:
    return "nf4" if config.quantize_base == "int8" else "int8 or nf4"


def _or_8_bit(config: TrainConfig, name: str) -> str:
    # Adafactor keeps almost nothing per weight; 8-bit AdamW a quarter of AdamW's, and only on NVIDIA GPUs.
    return "" if OPTIMIZERS[config.optimizer].state_bytes <= 2 else f" or {name}"


def _smaller_batches(config: TrainConfig, situation: Situation) -> list[tuple[Any, str]]:
    return [(size, "slower per picture") for size in (2, 1) if size < config.batch_size]


def _quantized(config: TrainConfig, situation: Situation) -> list[tuple[Any, str]]:
    # Before a lower resolution: 8-bit frozen weights cost little (QLoRA), training under the model's own size
    # costs detail.
    tries: list[tuple[Any, str]] = [("int8", "the frozen weights in 8 bits, a little less exact")]
    return tries + ([("nf4", "the frozen weights in 4 bits, less exact")] if situation.nvidia else [])


def _fewest_blocks(config: TrainConfig, situation: Situation) -> list[tuple[Any, str]]:
    """The fewest blocks to swap that fit the card, found by halving the range (the estimate falls as more swap);
    all of them where even that doesn't fit, for a lower resolution to try with."""
    low, high = config.blocks_to_swap + 1, situation.blocks()
    if low > high:
        return []
    while low < high:
        middle = (low + high) // 2
        if situation.fits(config.replace(blocks_to_swap=middle)):
            high = middle
        else:
            low = middle + 1
    return [(high, "the frozen blocks stream from the computer's memory each step, slower")]


def _lower_resolutions(config: TrainConfig, situation: Situation) -> list[tuple[Any, str]]:
    floor = max(256, situation.native_resolution // 2)
    return [(size, "less detail") for size in range(config.resolution - 128, floor - 1, -128)]


SAVERS = (
    Saver(
        "gradient_checkpointing",
        applies=lambda config: not config.gradient_checkpointing,
        advice=lambda config: "turn on gradient checkpointing",
        form_advice=lambda config: "turn on Gradient checkpointing (under Advanced)",
        lowers=(TRAINING,),
        tries=lambda config, situation: [(True, "about 30% slower")],
    ),
    Saver(
        "optimizer",
        applies=lambda config: config.optimizer != "adafactor",
        advice=lambda config: f"use the adafactor optimizer{_or_8_bit(config, '8-bit AdamW')}",
        form_advice=lambda config: f"set Optimizer to adafactor{_or_8_bit(config, 'adamw8bit')}",
        lowers=(TRAINING,),
        tries=lambda config, situation: [
            ("adamw8bit" if situation.nvidia else "adafactor", "its state in fewer bytes, about as good")
        ],
        used=lambda config: OPTIMIZERS[config.optimizer].state_bytes <= 2,  # 8-bit AdamW: Adafactor learns otherwise
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
        "blocks_to_swap",
        applies=lambda config: True,
        advice=lambda config: (
            f"keep more of the base model's blocks in the computer's memory (blocks_to_swap, now "
            f"{config.blocks_to_swap}): each step streams them to the GPU, slower"
        ),
        form_advice=lambda config: f"raise {SWAP_LABEL} (now {config.blocks_to_swap}; slower)",
        lowers=(TRAINING, PREVIEWS),
        tries=_fewest_blocks,
        swaps_blocks=True,
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


def tips(config: TrainConfig, family: str | None = None) -> list[str]:
    """What is left to change, in the settings' own names: for the out-of-memory message. `family`: the model's,
    where the settings' "auto" doesn't say (else told from the base model's files)."""
    return [saver.advice(config) for saver in _left(config, family)]


def form_tips(config: TrainConfig, phase: str, family: str | None = None) -> list[str]:
    """What is left to change to lower the estimate's `phase`, in the Train tab's labels."""
    return [saver.form_advice(config) for saver in _left(config, family) if phase in saver.lowers]


def _left(config: TrainConfig, family: str | None) -> list[Saver]:
    """The savers that apply to these settings: block swap only on a family whose blocks swap, once every saver
    before it is used."""
    left: list[Saver] = []
    for saver in SAVERS:
        if not saver.applies(config):
            continue
        cheaper = [before for before in left if not before.used(config)]
        if saver.swaps_blocks and (cheaper or not _swaps_blocks(config, family)):
            continue
        left.append(saver)
    return left


def _swaps_blocks(config: TrainConfig, family: str | None) -> bool:
    if family is None and config.family != "auto":
        family = config.family
    if family is None:
        from lora_gui.base_models import family_from_files  # reads the model's files, with torch loaded for them

        family = family_from_files(config.base_model)
    return family is not None and bool(get_family(family).swap_blocks)
