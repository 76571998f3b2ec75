"""The Train tab's presets: the app's own (presets/*.json), and where visitors are strangers, those each visitor
saves in their browser."""

from __future__ import annotations

import re
from typing import Any

import gradio as gr

from lora_gui.config import TrainConfig, as_preset, check_preset_name, list_presets, load_preset, save_preset
from lora_gui.errors import ConfigError, LoraGuiError
from lora_gui.ui import config_form
from lora_gui.ui.common import Ctx, error_notice, notice
from lora_gui.ui.model_choices import TINY_CHOICES

PRESET_HELP = "Fills in every setting below for a typical job."
SHORT_DESCRIPTION = 48  # characters of a preset's description its menu entry shows: the box cuts longer ones off


def describe_preset(ctx: Ctx, preset: str | None, my_presets: dict[str, Any] | None = None) -> dict[str, Any]:
    """The picked preset's whole description under the menu, whose entry shows only its start."""
    described = list_presets().get(preset or "", "") or ("saved in this browser" if preset else "")
    return {"preset": gr.update(info=f"{described} {PRESET_HELP}" if described else PRESET_HELP)}


def use_preset(ctx: Ctx, preset: str | None, my_presets: dict[str, Any] | None = None) -> dict[str, Any]:
    if not preset:
        return {"train_notice": notice("Pick a preset from the list first.", "warning")}
    mine = _browser_presets(ctx, my_presets)
    try:
        if preset in mine:
            config = TrainConfig.from_dict(mine[preset], source=f"the preset {preset}")
        else:
            config = load_preset(preset)
    except LoraGuiError as error:
        return {"train_notice": error_notice(error)}
    values: dict[str, Any] = config_form.widget_values(config)
    if config.base_model:
        values["base_model"] = config.base_model
    return {"train_notice": notice(f"Settings of the preset {preset} filled in."), **values}


def keep_preset(
    ctx: Ctx, preset_name: str, base_model: str, my_presets: dict[str, Any] | None = None, **settings: Any
) -> dict[str, Any]:
    """Save the form's settings as a preset: in the app's presets/ folder for the one user of their own app; where
    visitors are strangers, in the visitor's browser, so nothing a visitor saves reaches the server's files."""
    try:
        model = "" if base_model in TINY_CHOICES else base_model  # a tiny model is no preset's real model
        config = config_form.config_from_values({**settings, "base_model": model})
        if not ctx.shared:
            name = save_preset(preset_name or "", config).stem
            return {
                "train_notice": notice(f"Saved as the preset {name}."),
                "preset": gr.update(choices=preset_choices(), value=name),
            }
        name = check_preset_name(preset_name or "")
        if name in list_presets():
            raise ConfigError(f"the app has a preset named {name!r}; pick another name")
    except LoraGuiError as error:
        return {"train_notice": error_notice(error)}
    mine = {**_browser_presets(ctx, my_presets), name: as_preset(config).to_dict()}
    return {
        "train_notice": notice(f"Saved as the preset {name}, in this browser (the server keeps no copy)."),
        "preset": gr.update(choices=preset_choices(mine), value=name),
        "my_presets": mine,
    }


def preset_choices(mine: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """The app's presets, then the visitor's own (saved in their browser)."""
    shipped = [(f"{name}: {_short(description)}", name) for name, description in list_presets().items()]
    return shipped + [(f"{name}: saved in this browser", name) for name in mine or {}]


def _short(description: str) -> str:
    """A description's first clause without its asides ("Flux.1-dev on a 12 GB GPU"), cut at a word if long."""
    first = re.sub(r"\s*\([^)]*\)", "", description.split(":", 1)[0]).rstrip(" .,;")
    if len(first) <= SHORT_DESCRIPTION:
        return first
    return first[:SHORT_DESCRIPTION].rsplit(" ", 1)[0].rstrip(" ,;") + "…"


def _browser_presets(ctx: Ctx, my_presets: Any) -> dict[str, Any]:
    """The presets this visitor's browser keeps: only where visitors are strangers, and only well-formed ones: a
    name as `keep_preset` gives one (never a path, which the menu would offer and Use would read)."""
    if not ctx.shared or not isinstance(my_presets, dict):
        return {}
    return {name: values for name, values in my_presets.items() if _is_preset_name(name) and isinstance(values, dict)}


def _is_preset_name(name: object) -> bool:
    try:
        return isinstance(name, str) and check_preset_name(name) == name
    except ConfigError:
        return False


def preset_menu(ctx: Ctx, my_presets: Any) -> dict[str, Any]:
    """The preset menu with the visitor's own presets, for a page that has just loaded."""
    return gr.update(choices=preset_choices(_browser_presets(ctx, my_presets)))
