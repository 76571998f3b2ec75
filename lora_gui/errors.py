"""Errors a user can act on. Each message says what happened and what to do, in plain words."""

import math


class LoraGuiError(Exception):
    """An error whose message is meant for the user, not a developer."""


class ConfigError(LoraGuiError, ValueError):
    """A setting that makes no sense."""


class DataError(LoraGuiError):
    """The training images can't be used."""


class ModelLoadError(LoraGuiError):
    """The base model can't be found, downloaded or read."""


class LoraFileError(LoraGuiError):
    """A LoRA file can't be read or applied."""


class OutOfMemoryError(LoraGuiError):
    """The GPU (or the machine) ran out of memory."""


def check_between(name: str, value: float, low: float, high: float) -> None:
    """Raise ConfigError naming setting `name` unless `value` is a number from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number (got {value!r})")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g} (got {value:g})")
