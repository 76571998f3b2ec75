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
    if value < low and high >= NO_REAL_LIMIT:  # a bound no one reaches is no range to read
        raise ConfigError(f"{name} must be {_number(low)} or more (got {_number(value)})")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {_number(low)} and {_number(high)} (got {_number(value)})")


NO_REAL_LIMIT = 1_000_000


def _number(value: float) -> str:
    """A number as a person writes it: 4096, 0.5, 1e-08, 4,294,967,295 (never 1e+07)."""
    if float(value).is_integer() and abs(value) >= 10_000:
        return f"{int(value):,}"
    return f"{value:g}"
