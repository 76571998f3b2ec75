"""The Train tab's settings, generated from TrainConfig's fields, and the one way back to a TrainConfig.

Each widget's label, hint and kind (checkbox, menu, number, text) come from the field's type and
metadata, so a knob added to TrainConfig shows up here without touching the UI.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import gradio as gr

from lora_gui.adapter_kinds import ADAPTER_KINDS
from lora_gui.config import TrainConfig
from lora_gui.errors import ConfigError
from lora_gui.families import REGISTRY
from lora_gui.optimizers import OPTIMIZERS

# Set by the app itself: the base model has its own menu, the images come from the Dataset tab (validation
# pictures are held out of them: a folder of the server's is no visitor's to name; so do an edit's "before"
# pictures), and the dataset columns
# only matter for Hugging Face datasets, which the app does not take.
APP_FIELDS = (
    "base_model",
    "data",
    "control_data",
    "image_column",
    "caption_column",
    "control_column",
    "validation_data",
)
_WORDS = {"lr": "learning-rate", "snr": "min-SNR", "adam": "Adam", "te": "text-encoder", "max": "max."}
_LABELS = {
    "max_steps": "Steps",
    "lora_type": "Kind of LoRA",
    "resolution": "Resolution (pixels)",
    "family": "Model family",
    "max_grad_norm": "Gradient clipping (max. norm)",
    "channels_last": "Channels-last memory layout",
    "blocks_to_swap": "Blocks kept in the computer's memory (block swap)",
    "torch_compile": "Prepare the model first (torch.compile)",
    "snr_gamma": "Balance noise levels",
    "prodigy_d_coef": "Prodigy boldness (d coef)",
    "adam_beta1": "AdamW momentum (beta1)",
    "adam_beta2": "AdamW smoothing (beta2)",
    "mixed_precision": "Number precision",
    "lr_warmup_steps": "Learning-rate warm-up steps",
    "lr_scheduler": "Learning-rate schedule",
    "gradient_accumulation_steps": "Batches per update",
    "target_modules": "Model parts that get a LoRA",
    "text_encoder_target_modules": "Prompt-reader parts that get a LoRA",
}
# Settings the Train tab places itself, beside what they belong with, rather than in the main or Advanced rows: the
# trigger word goes with the question of what the pictures are of (a newcomer must see it, to use it in prompts).
SHOWN_APART = ("trigger_word",)
ADVANCED_GROUPS = {
    "Pictures and captions": ("default_caption", "caption_dropout", "aspect_buckets", "random_flip", "family"),
    "Learning": (
        *("epochs", "batch_size", "gradient_accumulation_steps", "optimizer", "lr_scheduler", "lr_warmup_steps"),
        *("text_encoder_learning_rate", "prodigy_d_coef", "adam_beta1", "adam_beta2", "adam_weight_decay"),
        *("adam_epsilon", "max_grad_norm", "snr_gamma", "noise_offset", "seed"),
    ),
    "What the LoRA changes": (
        "lora_type",
        "alpha",
        "target_modules",
        "train_text_encoder",
        "text_encoder_target_modules",
    ),
    "Checking on kept-out pictures": ("validation_images", "validation_every", "keep_best", "early_stop"),
    "Speed & memory": (
        *("mixed_precision", "gradient_checkpointing", "quantize_base", "blocks_to_swap", "channels_last"),
        "torch_compile",
    ),
    "Saving & previews": (
        *("checkpoint_every", "keep_checkpoints", "sample_prompts", "sample_every", "sample_steps", "sample_seed"),
        "log_every",
    ),
}
# Menu entries a person reads, for settings whose values are short codes.
_CHOICE_LABELS = {
    "family": {"auto": "auto (read it from the model)", **{name: family.title for name, family in REGISTRY.items()}},
    "lora_type": {name: kind.menu_title for name, kind in ADAPTER_KINDS.items()},
}


def _fields(main: bool) -> list[dataclasses.Field]:
    return [
        field
        for field in dataclasses.fields(TrainConfig)
        if field.name not in APP_FIELDS and (field.metadata["group"] == "main") == main
    ]


def field_names() -> list[str]:
    """Every setting that has a widget, main ones first."""
    return [field.name for field in _fields(True) + _fields(False)]


def label(name: str) -> str:
    if name in _LABELS:
        return _LABELS[name]
    words = [_WORDS.get(word, word) for word in name.split("_")]
    return " ".join(words)[:1].upper() + " ".join(words)[1:]


def build_widgets(main: bool, per_row: int, defaults: TrainConfig | None = None) -> dict[str, gr.components.Component]:
    """Widgets for the main settings or for all the others, `per_row` to a row, in field order, showing `defaults`
    (TrainConfig's own if none: the page's are those of the base model it starts with)."""
    defaults = defaults or TrainConfig()
    widgets: dict[str, gr.components.Component] = {}
    fields = [field for field in _fields(main) if field.name not in SHOWN_APART]
    if main:
        _rows(fields, defaults, per_row, widgets)
    else:  # Advanced: under headings a person can scan for what they came to change
        for title, names in advanced_groups().items():
            with gr.Column(elem_classes=["lg-settings-group"]):
                gr.Markdown(f"**{title}**")
                _rows([field for field in fields if field.name in names], defaults, per_row, widgets)
    if "learning_rate" in widgets:
        widgets["learning_rate"].info = learning_rate_help(defaults.optimizer, defaults.learning_rate)
    return widgets


def advanced_groups() -> dict[str, tuple[str, ...]]:
    """The Advanced settings by heading; a setting added to TrainConfig and named in none is under "Other"."""
    named = {name for names in ADVANCED_GROUPS.values() for name in names}
    other = tuple(field.name for field in _fields(False) if field.name not in named | set(SHOWN_APART))
    return {**ADVANCED_GROUPS, **({"Other": other} if other else {})}


def _rows(
    fields: list[dataclasses.Field], defaults: TrainConfig, per_row: int, widgets: dict[str, gr.components.Component]
) -> None:
    for start in range(0, len(fields), per_row):
        with gr.Row(equal_height=True):
            for field in fields[start : start + per_row]:
                widgets[field.name] = _widget(field, getattr(defaults, field.name))


def build_widget(name: str) -> gr.components.Component:
    """The widget of one setting, for a setting the tab places itself (SHOWN_APART)."""
    (field,) = [field for field in dataclasses.fields(TrainConfig) if field.name == name]
    return _widget(field, getattr(TrainConfig(), name))


def learning_rate_help(optimizer: str, rate: float) -> str:
    """The learning rate's hint for the rate the box holds: the optimizer's own, and where the box holds a rate far
    above its usual one (the demo's), why, so the hint never says 1e-4 beside 0.002."""
    usual = OPTIMIZERS[optimizer].learning_rate
    if isinstance(rate, (int, float)) and rate > 4 * usual:
        return (
            f"How big each learning update is. {rate:g} is far above the usual {usual:g}: right for the demo and "
            f"tiny models, which learn fast; for a real model start at {usual:g}, or lower it if the previews fall "
            "apart."
        )
    return OPTIMIZERS[optimizer].rate_help


def _widget(field: dataclasses.Field, default: Any) -> gr.components.Component:
    common = {"label": label(field.name), "info": field.metadata["help"], "elem_id": f"setting-{field.name}"}
    if "choices" in field.metadata:
        names = _CHOICE_LABELS.get(field.name, {})
        choices = [(names.get(choice, choice), choice) for choice in field.metadata["choices"]]
        return gr.Dropdown(choices=choices, value=default, **common)
    if isinstance(default, bool):
        return gr.Checkbox(value=default, **common)
    if isinstance(default, int):
        return gr.Number(value=default, precision=0, **common)
    if isinstance(default, float):
        return gr.Number(value=default, **common)
    if isinstance(default, list):
        return gr.Textbox(value="\n".join(default), lines=2, **{**common, "info": common["info"] + " One per line."})
    return gr.Textbox(value=default, **common)


def config_from_values(values: dict[str, Any]) -> TrainConfig:
    """THE place where widget values become a TrainConfig (validated; ConfigError says what is wrong).

    `values` holds each setting by field name: the widgets' values plus base_model and data.
    """
    defaults = TrainConfig()
    settings = {}
    for name, value in values.items():
        if value is None:
            raise ConfigError(f"{label(name)} is empty: type a value (the default is {getattr(defaults, name)})")
        if isinstance(getattr(defaults, name), list) and isinstance(value, str):
            value = [line.strip() for line in value.splitlines() if line.strip()]
        settings[name] = value
    try:
        return TrainConfig.from_dict(settings)
    except ConfigError as error:
        raise ConfigError(labelled(str(error))) from None


def labelled(message: str) -> str:
    """An engine message with each setting named by its label on the page, not as the code names it."""
    names = "|".join(sorted(field_names(), key=len, reverse=True))
    return re.sub(rf"\b({names})\b", lambda m: f"'{label(m.group(1))}'", message)


def widget_values(config: TrainConfig) -> dict[str, Any]:
    """The widgets' values that show `config` (lists one item per line)."""
    return {
        name: "\n".join(value) if isinstance(value, list) else value
        for name in field_names()
        for value in [getattr(config, name)]
    }
