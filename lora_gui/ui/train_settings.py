"""The Train tab's settings as they are filled in: the settings suggested for the visitor's pictures, the estimate
of a run's memory and time, what follows the optimizer picked, and the token box that follows the base model."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_gui import memory_savers, quantization
from lora_gui.config import TrainConfig
from lora_gui.errors import ConfigError, LoraGuiError
from lora_gui.families import REGISTRY, base_for_training, get_family
from lora_gui.optimizers import OPTIMIZERS, settings_for_optimizer
from lora_gui.owners import Visitor
from lora_gui.staging import Staging
from lora_gui.ui import config_form
from lora_gui.ui.common import Ctx, error_notice, notice, plain_error
from lora_gui.ui.model_choices import TINY_CHOICE, TINY_CHOICES, quick_settings

if TYPE_CHECKING:
    from lora_gui.estimate import Estimate


def suggest_settings(
    ctx: Ctx, visitor: Visitor, session: str, base_model: str, subject: str, **settings: Any
) -> dict[str, Any]:
    """Settings for the visitor's staged pictures of a person, an object or a style, on this computer's GPU (or its
    processor), each with its reason; only what fits by the estimate. A demo or tiny model gets its quick settings."""
    if not subject:
        return {"suggestions": notice("Say first what the pictures are of: a person, an object or a style.", "warning")}
    if (base_model or "").strip() in TINY_CHOICES:
        return _quick_suggestion(base_model.strip(), settings.get("trigger_word") or "")
    try:
        config = config_form.config_from_values({**settings, "base_model": ""})
        family = config.family if config.family != "auto" else ctx.models.family(base_model)
        if family is None:
            raise ConfigError(
                "to suggest settings, the kind of model must be known without downloading it: set 'Model family' "
                "under Advanced settings"
            )
        staging = Staging.find(ctx.runs_dir, session, visitor)
        usable = staging.check(config.resolution, config.default_caption).usable if staging is not None else []
        if not usable:
            raise LoraGuiError("there are no usable pictures yet: add some in the Dataset tab first")
        from lora_gui.suggest import Card, Pictures, suggest

        suggestion = suggest(Pictures.of(usable), subject, family, Card.here(), config)
    except LoraGuiError as error:
        return {"suggestions": error_notice(error)}
    reasons = "".join(
        f"<li><b>{html.escape(config_form.label(change.setting))}</b>: {html.escape(change.value_text)}. "
        f"{html.escape(change.reason[:1].upper() + change.reason[1:])}.</li>"
        for change in suggestion.changes
    )
    notes = " ".join(html.escape(note) for note in suggestion.notes)
    if not ctx.engine.has_cuda:
        notes += " " + html.escape(_processor_time(suggestion.config, family, tiny=False))
    return {
        "suggestions": f'<div class="lg-suggestions"><p>{notes}</p><ul>{reasons}</ul></div>',
        **config_form.widget_values(suggestion.config),
    }


def show_estimate(ctx: Ctx, base_model: str, **settings: Any) -> dict[str, Any]:
    """About how much GPU memory and time a run with these settings takes, before it is started."""
    from lora_gui import devices
    from lora_gui.estimate import estimate, presets_that_fit

    try:
        config = config_form.config_from_values({**settings, "base_model": ""})
    except LoraGuiError as error:
        return {"estimate": notice(f"No estimate until the settings are fixed: {plain_error(error)}", "warning")}
    family = config.family if config.family != "auto" else ctx.models.family(base_model)
    if family is None:
        return {
            "estimate": notice(
                "To estimate GPU memory and time, the kind of model must be known without downloading it: set "
                f"'Model family' under Advanced settings ({', '.join(f.title for f in REGISTRY.values())})."
            )
        }
    title = get_family(family).title
    tiny = base_model in TINY_CHOICES
    precision = devices.gpu_precision(config.mixed_precision)
    try:
        card_gb = devices.gpu_memory_gb() if ctx.engine.has_cuda and not tiny else None
        result = estimate(config, family, precision, None if tiny else ctx.engine.gpu_tflops(), card_gb)
    except (ValueError, RuntimeError) as error:  # peft refuses layer names that match nothing in the UNet
        return {"estimate": notice(f"No estimate for these settings: {error}", "warning")}
    memory = f"≈ {result.memory_gb:.1f} GB of GPU memory"
    if tiny:
        text = (
            f"The demo and tiny models need almost no memory. {_processor_time(config, family, tiny)} For "
            f"comparison, a real {title} model with these settings would need {memory}."
        )
    elif not ctx.engine.has_cuda:
        text = (
            f"On a GPU, these settings would need {memory} ({title}). This computer has no NVIDIA GPU, so training "
            f"runs on the processor. {_processor_time(config, family, tiny)}"
        )
        text += f" On a GPU: {result.swap_note}" if result.swap_note else ""
        try:
            quantization.check_available(config.quantize_base, on_cuda=False)
        except LoraGuiError as error:  # said now, not only when Start fails
            text += " " + plain_error(LoraGuiError(config_form.labelled(str(error))))
    else:
        text = f"Estimate for {title}: {result.summary()}"
        if result.seconds is None and config.epochs:
            text += " The time depends on how many pictures you have, as Epochs is set."
        elif result.seconds is None:
            text += " The time shows once no run is training: this GPU's speed is measured then."
        total = devices.gpu_memory_gb() or 0.0
        fitting = presets_that_fit(family, precision, total)
        if result.memory_gb > total:
            text += f" That is more than this GPU's {total:.0f} GB: " + _memory_advice(config, family, result, fitting)
        elif fitting:
            name, memory_gb = fitting[0]
            text += (
                f" Of the presets for {title}, {name} makes the most of this {total:.0f} GB GPU (≈ {memory_gb:.1f} GB)."
            )
    hint = "" if tiny else get_family(family).resolution_hint(config.resolution)
    trained_instead = base_for_training(base_model)[1]  # a distilled model's base, and why
    notes = (notice(hint, "warning") if hint else "") + (notice(trained_instead) if trained_instead else "")
    return {"estimate": notice(text) + notes}


def _quick_suggestion(choice: str, trigger_word: str) -> dict[str, Any]:
    """A demo or tiny model's suggestion: its quick settings, whatever the pictures (it draws at its own small size
    and learns in minutes), with the trigger word kept."""
    config = quick_settings(choice).replace(trigger_word=trigger_word)
    said = (
        f"The demo and tiny models learn best with their own quick settings, whatever the pictures show: "
        f"{config.resolution} px (the size they draw), {config.max_steps} steps, learning rate "
        f"{config.learning_rate:g}, LoRA rank {config.rank}. {_processor_time(config, '', tiny=True)}"
    )
    return {"suggestions": notice(said), **config_form.widget_values(config)}


def settings_for_model(ctx: Ctx, base_model: str, **settings: Any) -> dict[str, Any]:
    """What picking a base model sets: a demo or tiny model its quick settings (64 px, a few hundred steps); a real
    one the size its family was made for, and the usual defaults where the form still holds the quick settings
    (the demo's learning rate would wreck a real model). A model whose family can't be told yet changes nothing."""
    choice = (base_model or "").strip()
    if choice in TINY_CHOICES:
        config = quick_settings(choice)
    else:
        family = ctx.models.family(choice)
        if family is None:
            return {}
        try:
            current = config_form.config_from_values({**settings, "base_model": ""})
        except LoraGuiError:
            current = TrainConfig()
        quick = quick_settings(TINY_CHOICE)
        still_quick = all(getattr(current, name) == getattr(quick, name) for name in ("resolution", "learning_rate"))
        config = (TrainConfig() if still_quick else current).replace(resolution=get_family(family).default_resolution)
        # The demo trains its model's text encoder; a family that trains its denoiser alone would refuse the run.
        trains_text_encoder = config.train_text_encoder and get_family(family).trains_text_encoders
        config = config.replace(train_text_encoder=trains_text_encoder)
    rate = gr.update(
        value=config.learning_rate, info=config_form.learning_rate_help(config.optimizer, config.learning_rate)
    )
    return {**config_form.widget_values(config), "learning_rate": rate}


def _processor_time(config: TrainConfig, family: str, tiny: bool) -> str:
    """How long these settings train on this computer's processor, said to be rough."""
    from lora_gui.estimate import duration, processor_seconds

    seconds = processor_seconds(config, family, tiny)
    if seconds is None:
        return "On this computer's processor the time depends on how many pictures you have, as Epochs is set."
    pace = "the demo's own pace" if tiny else "a measured processor's pace"
    shorter = "" if seconds < 600 else " Fewer steps or a smaller resolution shorten it."
    return f"On this computer's processor: about {duration(seconds)} (rough, from {pace}).{shorter}"


def pick_optimizer(ctx: Ctx, base_model: str, **settings: Any) -> dict[str, Any]:
    """Settings that fit the optimizer just picked, so the form stays valid (Prodigy's learning rate is 1.0, where
    AdamW's is 1e-4), the learning rate's hint for it, and the estimate, which its state changes."""
    optimizer = settings["optimizer"]
    changes = settings_for_optimizer(
        optimizer,
        settings["learning_rate"],
        settings["text_encoder_learning_rate"],
        settings["lr_scheduler"],
        settings["lr_warmup_steps"],
    )
    rate = changes.get("learning_rate", settings["learning_rate"])
    value = {"value": rate} if "learning_rate" in changes else {}
    return {
        **changes,
        "learning_rate": gr.update(info=config_form.learning_rate_help(optimizer, rate), **value),
        **show_estimate(ctx, base_model, **{**settings, **changes}),
    }


def _memory_advice(config: TrainConfig, family: str, result: Estimate, fitting: list[tuple[str, float]]) -> str:
    """What lowers the phase that needs the most memory: first the preset made for this card, if one is."""
    preset = f"pick the {fitting[0][0]} preset (≈ {fitting[0][1]:.1f} GB), or " if fitting else ""
    if result.previews_gb >= result.training_gb:
        # Previews decode a full-size picture; the low-VRAM presets keep the resolution, so they don't help.
        tips = ", ".join(memory_savers.form_tips(config, memory_savers.PREVIEWS, family))
        return preset + (f"{tips}: " if tips else "") + "the preview images need the most."
    tips = memory_savers.form_tips(config, memory_savers.TRAINING, family)
    return preset + "".join(f"{tip}, " for tip in tips) + "or pick a low-VRAM preset."


def rate_hint(ctx: Ctx, optimizer: str, learning_rate: float | None) -> dict[str, Any]:
    """The learning rate's hint for the rate the box holds now, whatever set it (a preset, the demo, Suggest)."""
    if optimizer not in OPTIMIZERS or not isinstance(learning_rate, (int, float)):
        return {}
    return {"learning_rate": gr.update(info=config_form.learning_rate_help(optimizer, learning_rate))}


def show_token_box(ctx: Ctx, base_model: str) -> dict[str, Any]:
    """The Hugging Face token box, only for a base model whose download may need a token."""
    return {"hf_token": gr.update(visible=ctx.models.needs_token(base_model))}
