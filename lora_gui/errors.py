"""Errors a user can act on. Each message says what happened and what to do, in plain words."""


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
