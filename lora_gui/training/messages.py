"""How a run ends in words: a stop with what was saved, errors turned into messages a person can act on, and the
run's train.log."""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from pathlib import Path

from lora_gui import devices, memory_savers
from lora_gui.config import TrainConfig
from lora_gui.errors import LoraGuiError, OutOfMemoryError
from lora_gui.runs import RunFolder


class Stopped(Exception):
    """The user asked the run to stop; carries what was saved by then."""

    def __init__(self, step: int = 0, total_steps: int = 0, lora: Path | None = None, checkpoint: Path | None = None):
        super().__init__("stopped")
        self.step, self.total_steps, self.lora, self.checkpoint = step, total_steps, lora, checkpoint


@contextlib.contextmanager
def log_to(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("lora_gui")
    package.addHandler(handler)
    previous = package.level
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)
        handler.close()


def user_error(error: Exception, config: TrainConfig, run: RunFolder) -> LoraGuiError:
    """The error as the user should see it: what happened and what to do."""
    if isinstance(error, LoraGuiError):
        return error
    resumable = " The last checkpoint stays resumable." if run.latest_checkpoint() else ""
    if devices.is_out_of_memory(error):
        return OutOfMemoryError(oom_advice(config) + "." + resumable)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return LoraGuiError(
            f"the disk is full ({error.filename or run.path}): free some space, then resume the run.{resumable}"
        )
    return LoraGuiError(
        f"training stopped on an unexpected error: {type(error).__name__}: {error}. "
        f"Details are in {run.log}.{resumable}"
    )


def oom_advice(config: TrainConfig) -> str:
    """What to change when the GPU runs out of memory, fitted to the settings, least harmful first."""
    return "the GPU ran out of memory. To fit: " + "; ".join([*memory_savers.tips(config), "or pick a low-VRAM preset"])
