"""A run's LoRA in each layout other tools load, written (again) from its run folder.

Everything the kohya file says is rebuilt from the run folder (see `metadata`), so exporting a run
again, any time later, gives the file training wrote.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lora_gui.atomic import atomic_path
from lora_gui.errors import LoraFileError
from lora_gui.families import get_family
from lora_gui.lora_files import LORA_LAYOUTS
from lora_gui.lora_files.diffusers_layout import read_diffusers_lora
from lora_gui.lora_files.kohya_layout import save_kohya_lora, to_kohya
from lora_gui.lora_files.metadata import lora_metadata
from lora_gui.runs import DIFFUSERS_LORA, RunFolder, TrainingRecord

log = logging.getLogger(__name__)


def write_kohya_lora(
    run: RunFolder,
    target: Path | None = None,
    lora: Path | None = None,
    record: TrainingRecord | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the run's LoRA in kohya's layout (A1111, Forge, ComfyUI) with its metadata. Another LoRA of the run
    (`lora`, in diffusers' layout: the best step's) comes with its own `record` and `extra` metadata."""
    state, configs = read_diffusers_lora(lora or run.diffusers_lora)
    record = record or TrainingRecord.load(run)
    tensors = to_kohya(state, configs, get_family(record.family))
    metadata = {**lora_metadata(run, record, configs), **(extra or {})}
    target = save_kohya_lora(target or run.kohya_lora, tensors, metadata)
    log.info("kohya LoRA saved to %s", target)
    return target


def export_run(run_dir: str | Path, layout: str = "kohya", output: str | Path | None = None) -> list[Path]:
    """Write a finished (or stopped) run's LoRA again, in kohya's layout, diffusers', or both.

    Without `output` the files go into the run folder. With it, `output` is the file to write, or a
    folder (always, for both layouts) to write them into under their usual names.
    """
    run = RunFolder(Path(run_dir))
    if layout not in LORA_LAYOUTS:
        raise LoraFileError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LORA_LAYOUTS)}")
    if not run.diffusers_lora.is_file():
        raise LoraFileError(f"{run.path} holds no {DIFFUSERS_LORA}: has training saved a LoRA there yet?")
    written = []
    if layout in ("kohya", "both"):
        written.append(write_kohya_lora(run, _target(output, run.kohya_lora, layout)))
    if layout in ("diffusers", "both"):
        target = _target(output, run.diffusers_lora, layout)
        if target != run.diffusers_lora:
            with atomic_path(target) as tmp:
                shutil.copyfile(run.diffusers_lora, tmp)
        written.append(target)
    return written


def _target(output: str | Path | None, default: Path, layout: str) -> Path:
    if output is None:
        return default
    output = Path(output).expanduser().resolve()
    if layout == "both" or output.is_dir():
        return output / default.name
    if output.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{output.name}: LoRA files are written as .safetensors; give a name ending in that")
    return output
