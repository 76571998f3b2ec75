"""Suggested settings: from the pictures, what they show, the model family and the card, each with one reason.

Reads only what the Dataset tab's checks already read (each picture's size from its header, its caption) and a
`Card` (its memory and whether it computes bf16; simulated in tests). Every suggestion is checked with the
memory estimate: where it would not fit the card, memory savers (memory_savers.py) are added one at a time until it
does, and then those it turned out not to need are taken back, so a big card keeps the fast settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lora_gui import devices, memory_savers
from lora_gui.config import TrainConfig
from lora_gui.data import Example
from lora_gui.errors import LoraGuiError
from lora_gui.estimate import REFERENCE_TFLOPS, Estimate, estimate, swappable_blocks
from lora_gui.families import get_family

SUBJECTS = ("person", "object", "style")
# The share of the card a suggestion may fill: the desktop and the allocator's fragmentation take some too.
HEADROOM = 0.95

# Steps: in kohya's accounting (steps = pictures x repeats x epochs / batch size) the usual rule of thumb is about
# 100 looks at each picture of a person or an object (say 10 repeats x 10 epochs); a style's pictures are many and
# varied, so each needs fewer. The floor: diffusers' DreamBooth write-up found faces need 800-1200 steps
# (https://huggingface.co/blog/dreambooth, full fine-tuning); the presets here train 1200-2000. The ceiling: LoRA
# guides for SDXL and Flux (ai-toolkit's examples train 2000) put the useful range at 1000-3000 steps; past that
# a LoRA mostly memorizes its pictures.
SEEN_PER_PICTURE = {"person": 100, "object": 100, "style": 50}
SEEN_FLOOR = {"person": 800, "object": 800, "style": 1000}
SEEN_CEILING = 3000
# Rank: the character preset's 32 and TrainConfig's own advice (16-32 for a person); the object and style presets'
# 16; a style whose captions already describe each picture leaves the LoRA only the look to learn: 8 (the advice's
# 4-8 for a style).
RANK = {"person": 32, "object": 16, "style": 16}
RICH_CAPTION_WORDS = 12  # mean words per caption from which a style's captions count as describing the pictures
# Caption dropout: ai-toolkit's default caption_dropout_rate is 0.05, as the character presets here; the style
# presets drop 10% so the look comes through without its words.
CAPTION_DROPOUT = {"person": 0.05, "object": 0.05, "style": 0.1}
# Mirroring: the object and style presets mirror; faces are not symmetric, so the character presets don't.
RANDOM_FLIP = {"person": False, "object": True, "style": True}
LEARNING_RATE = 1e-4  # every preset here and diffusers' LoRA training scripts
VALIDATION_FROM = 12  # pictures from which 2 are held out (config: "a set needs 8 pictures or more to spare them")
TRIGGER_WORD = "ohwx"  # the rare token kohya guides use: it means nothing to the text encoder yet


@dataclass(frozen=True)
class Card:
    """The GPU the settings are for: its memory and whether it computes bf16."""

    memory_bytes: int
    bf16: bool
    assumed: bool = False  # a card that is not here, to size settings for (`ASSUMED_CARD`)
    processor: bool = False  # no GPU here: this computer's processor and memory

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / 2**30

    @classmethod
    def here(cls) -> Card:
        """This machine's GPU, or the assumed card where there is none."""
        gpu = devices.card()
        if gpu is None:
            return cls(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), bf16=False, processor=True)
        return cls(int(gpu.memory_gb * 2**30), gpu.bf16)

    @property
    def called(self) -> str:
        """How a message names it: "this 12 GB card", "this computer's 32 GB of memory"."""
        if self.processor:
            return f"this computer's {self.memory_gb:.0f} GB of memory"
        return f"this {self.memory_gb:.0f} GB card"

    def describe(self) -> str:
        if self.processor:
            return (
                f"No GPU here: these settings are for this computer's processor and its {self.memory_gb:.0f} GB of "
                "memory. A processor trains the demo and tiny models in a minute or two, a real model for hours."
            )
        if self.assumed:
            return (
                f"No GPU here: these settings assume a {self.memory_gb:.0f} GB card that computes bf16 (an RTX 3090 "
                "or 4090, what most LoRA guides train on). On this computer's processor a real model trains for hours."
            )
        return f"Sized for this {self.memory_gb:.0f} GB GPU{'' if self.bf16 else ' (fp16: it does not compute bf16)'}."


ASSUMED_CARD = Card(24 * 2**30, bf16=True, assumed=True)


@dataclass(frozen=True)
class Pictures:
    """What a suggestion reads of the training pictures: their short sides and their captions."""

    short_sides: tuple[int, ...]
    captions: tuple[str, ...]

    @classmethod
    def of(cls, examples: Iterable[Example]) -> Pictures:
        examples = list(examples)
        return cls(tuple(min(example.size) for example in examples), tuple(example.caption for example in examples))

    @property
    def count(self) -> int:
        return len(self.short_sides)


@dataclass(frozen=True)
class Change:
    setting: str
    value: Any
    reason: str

    @property
    def value_text(self) -> str:
        """The value as a person reads it: on/off, 1e-04, none."""
        if isinstance(self.value, bool):
            return "on" if self.value else "off"
        if isinstance(self.value, float):
            return f"{self.value:g}"
        return str(self.value) if self.value != "" else "none"


@dataclass
class Suggestion:
    config: TrainConfig
    changes: list[Change]
    estimate: Estimate
    notes: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # settings it would have changed, left as the user gave them


def suggest(
    pictures: Pictures,
    subject: str,
    family: str,
    card: Card,
    base: TrainConfig | None = None,
    keep: Iterable[str] = (),
) -> Suggestion:
    """Settings for these pictures of a `subject` (person, object or style) on a model of `family`, trained on
    `card`: `base` with the suggested changes, except to the settings named in `keep` (the user's own).

    Raises LoraGuiError when nothing fits the card."""
    if subject not in SUBJECTS:
        raise LoraGuiError(f"say what the pictures are of: {', '.join(SUBJECTS)} (got {subject!r})")
    if not pictures.count:
        raise LoraGuiError("there are no usable pictures yet: add some first")
    base, keep = base or TrainConfig(), set(keep)
    precision = base.mixed_precision if base.mixed_precision != "auto" else ("bf16" if card.bf16 else "fp16")
    precision = "no" if card.processor else precision  # a processor trains in full precision
    wanted = {change.setting: change for change in _wanted(pictures, subject, family, base)}
    kept = [name for name in (*wanted, "max_steps") if name in keep]
    wanted = {name: change for name, change in wanted.items() if name not in keep}
    config = base.replace(**{name: change.value for name, change in wanted.items()})
    config, savers, result = _fit(config, family, card, precision, keep)
    changes = {**wanted, **savers}
    if "max_steps" not in keep:  # the length follows the batch size the card allows
        changes["max_steps"] = _steps(pictures, subject, config)
        config = config.replace(max_steps=changes["max_steps"].value)
        if config.epochs and "epochs" not in keep:
            changes["epochs"] = Change("epochs", 0, "the steps above set the length instead")
            config = config.replace(epochs=0)
    notes = [
        card.describe(),
        f"The estimate for these settings: ≈ {result.memory_gb:.1f} GB of {card.called}.",
    ]
    return Suggestion(config, list(changes.values()), result, notes, kept)


def _wanted(pictures: Pictures, subject: str, family: str, base: TrainConfig) -> list[Change]:
    """What these pictures call for on a card with room to spare."""
    batch = 4 if pictures.count >= 100 else 2 if pictures.count >= 30 else 1
    changes = [
        _resolution(pictures, family),
        _rank(pictures, subject),
        Change("optimizer", "adamw", "AdamW, the usual optimizer; there is memory for its full state"),
        Change("learning_rate", LEARNING_RATE, "1e-4, what every preset here and diffusers' LoRA scripts use"),
        Change(
            "batch_size",
            batch,
            f"{pictures.count} pictures: several per step is faster per picture and steadier"
            if batch > 1
            else "few pictures: one per step",
        ),
        Change("gradient_checkpointing", False, "off: it costs about 30% speed, and the memory is there without it"),
        Change("quantize_base", "none", f"the {get_family(family).denoiser_title} fits in memory unquantized, exactly"),
        *(
            [Change("blocks_to_swap", 0, "none: the whole model on the GPU, the fastest")]
            if get_family(family).swap_blocks
            else []
        ),
        Change(
            "caption_dropout",
            CAPTION_DROPOUT[subject],
            "a style should come through without its words"
            if subject == "style"
            else "a few steps without captions, so the LoRA also works with short prompts",
        ),
        Change(
            "random_flip",
            RANDOM_FLIP[subject],
            "faces aren't symmetric: mirrored ones would blur the likeness"
            if subject == "person"
            else "mirrored pictures double the variety for free",
        ),
    ]
    if not base.validation_data:
        held = 2 if pictures.count >= VALIDATION_FROM else 0
        changes.append(
            Change(
                "validation_images",
                held,
                "2 pictures held out: their loss shows when more steps stop helping"
                if held
                else f"under {VALIDATION_FROM} pictures: none to spare for a validation loss",
            )
        )
    if subject != "style" and not base.trigger_word and not _shared_word(pictures.captions):
        changes.append(
            Change(
                "trigger_word",
                TRIGGER_WORD,
                "no word is in every caption: training puts this made-up one in front of each, so use it in your "
                "prompts to call the LoRA up",
            )
        )
    if base.optimizer == "prodigy" and "optimizer" not in {change.setting for change in changes}:
        changes = [change for change in changes if change.setting != "learning_rate"]  # Prodigy's rate is its own
    return changes


def _resolution(pictures: Pictures, family: str) -> Change:
    """The model's own size, unless most pictures are smaller: training above them would only upscale them."""
    title = get_family(family).title
    native = get_family(family).default_resolution
    # "Most pictures": three quarters have a short side at least this big; above it training upscales them.
    most = sorted(pictures.short_sides)[pictures.count // 4] // 64 * 64
    resolution = max(64, min(native, most))
    if resolution == native:
        return Change("resolution", resolution, f"{title}'s own size, and your pictures are at least that big")
    smaller = sum(side < native for side in pictures.short_sides)
    why = (
        f"{smaller} of your {pictures.count} pictures are smaller than {title}'s own {native} px, and three "
        f"quarters are at least {resolution} px: above that, training would only upscale them"
    )
    return Change("resolution", resolution, why)


def _rank(pictures: Pictures, subject: str) -> Change:
    """Room for what the subject needs the LoRA to learn; less for a style whose captions say the rest."""
    words = sum(len(caption.split()) for caption in pictures.captions) / pictures.count
    if subject == "style" and words >= RICH_CAPTION_WORDS:
        why = f"your captions describe each picture (about {words:.0f} words), so the LoRA only needs the look"
        return Change("rank", 8, why)
    why = {
        "person": "a face and its features need room: 16-32 is usual for a person",
        "object": "one object needs less room than a face",
        "style": "a style with sparse captions leaves the LoRA the content to learn as well",
    }[subject]
    return Change("rank", RANK[subject], why)


def _shared_word(captions: tuple[str, ...]) -> bool:
    """Whether some word of four letters or more is in every caption: a trigger word already, most likely."""
    words = [{word.strip(",.;:").lower() for word in caption.split()} for caption in captions]
    return any(len(word) >= 4 for word in set.intersection(*words)) if words else False


def _steps(pictures: Pictures, subject: str, config: TrainConfig) -> Change:
    trained = pictures.count - config.validation_images
    seen = min(SEEN_CEILING, max(SEEN_FLOOR[subject], trained * SEEN_PER_PICTURE[subject]))
    steps = math.ceil(seen / config.batch_size)
    if seen == SEEN_CEILING:
        why = f"{SEEN_CEILING} pictures seen at most: past that a LoRA mostly memorizes"
    elif seen == SEEN_FLOOR[subject]:
        why = f"few pictures, but a {subject} needs about {seen} pictures seen to take hold"
    else:
        why = f"about {SEEN_PER_PICTURE[subject]} looks at each of your {trained} training pictures"
    if config.batch_size > 1:
        why += f", {config.batch_size} per step"
    return Change("max_steps", steps, why)


def _swap_cost(config: TrainConfig, family: str, precision: str, blocks: int) -> str:
    """What block swap costs a run, in speed as the card most guides train on computes (no card's speed is known
    here), and in the computer's memory."""
    slowdown = estimate(config.replace(gradient_checkpointing=True), family, precision, REFERENCE_TFLOPS).swap_slowdown
    slowdown = slowdown or 0
    speed = "hardly slower" if slowdown < 0.01 else f"about {slowdown:.0%} slower"
    return (
        f"{config.blocks_to_swap} of the {blocks} blocks wait in the computer's memory and stream to the GPU each "
        f"step, {speed} on an RTX 3090"
    )


def _fit(
    config: TrainConfig, family: str, card: Card, precision: str, keep: set[str]
) -> tuple[TrainConfig, dict[str, Change], Estimate]:
    """`config` with memory savers added until the estimate fits the card, then those it can do without taken back."""
    budget = card.memory_gb * HEADROOM
    result = estimate(config, family, precision, card_gb=budget)
    roomy = config
    applied: dict[str, str] = {}  # setting -> what its saver costs
    situation = memory_savers.Situation(
        get_family(family).default_resolution,
        nvidia=not card.assumed and not card.processor,  # without a GPU here, bitsandbytes' CUDA kernels won't run
        blocks=lambda: swappable_blocks(config, family),
        fits=lambda tried: estimate(tried, family, precision, card_gb=budget).memory_gb <= budget,
    )
    for saver in memory_savers.SAVERS:
        if result.memory_gb <= budget:
            break
        # Each saver's tries start from the settings so far: block swap looks for the fewest blocks with them.
        for value, cost in saver.tries(config, situation) if saver.setting not in keep else ():
            if result.memory_gb <= budget:
                break
            tried = config.replace(**{saver.setting: value})
            tried_result = estimate(tried, family, precision, card_gb=budget)
            if tried_result.memory_gb < result.memory_gb:
                config, result = tried, tried_result
                applied[saver.setting] = cost
    if result.memory_gb > budget:
        raise LoraGuiError(
            f"even with every memory saver, a {get_family(family).title} LoRA needs ≈ {result.memory_gb:.1f} GB, more "
            f"than {card.called} holds: pick a smaller base model"
        )
    for setting in list(applied)[-2::-1]:  # the last saver made it fit; an earlier one may not be needed with it
        tried = config.replace(**{setting: getattr(roomy, setting)})
        tried_result = estimate(tried, family, precision, card_gb=budget)
        if tried_result.memory_gb <= budget:
            config, result = tried, tried_result
            del applied[setting]
    first = estimate(roomy, family, precision, card_gb=budget).memory_gb
    if "blocks_to_swap" in applied:
        applied["blocks_to_swap"] = _swap_cost(config, family, precision, situation.blocks())
        if (
            not config.gradient_checkpointing
        ):  # what block swap turns on anyway, said so, and its cost not counted twice
            config = config.replace(gradient_checkpointing=True)
            applied["gradient_checkpointing"] = "block swap needs it (backward reads each streamed block again)"
    changes = {
        setting: Change(
            setting, getattr(config, setting), f"to fit in memory (≈ {first:.1f} GB without the memory savers): {cost}"
        )
        for setting, cost in applied.items()
    }
    return config, changes, result
