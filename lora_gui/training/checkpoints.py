"""A run's saved state: its checkpoints (saved, loaded, and the settings a resume changes), its LoRA files, and the
record of how far training went that their metadata is built from."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from diffusers import DiffusionPipeline

from lora_gui import events
from lora_gui.adapters import load_trained_lora
from lora_gui.atomic import atomic_folder, being_written, write_text_atomic
from lora_gui.config import CHANGEABLE_ON_RESUME, TrainConfig
from lora_gui.errors import LoraGuiError
from lora_gui.events import Event, EventHandler
from lora_gui.families import Family
from lora_gui.hub import write_model_card
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora
from lora_gui.lora_files.export import write_kohya_lora
from lora_gui.optimizers import OPTIMIZERS
from lora_gui.runs import TRAINER_STATE, RunFolder, TrainingRecord

if TYPE_CHECKING:
    from lora_gui.training.setup import Training

log = logging.getLogger(__name__)


def checkpoint_lora_only(accelerator: Accelerator, pipe: DiffusionPipeline, family: type[Family]) -> None:
    """Make accelerate's checkpoints hold the LoRA alone (a usable LoRA file), not the frozen base model."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_diffusers_lora(Path(output_dir) / "pytorch_lora_weights.safetensors", pipe, family)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        load_trained_lora(Path(input_dir) / "pytorch_lora_weights.safetensors", pipe, family)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(t: Training, step: int, emit: EventHandler) -> None:
    """Full training state (LoRA, optimizer, scheduler, RNG) into checkpoints/step-N, atomically."""
    accelerator, run = t.accelerator, t.run
    target = run.checkpoint(step)
    main = accelerator.is_main_process
    # Every process writes its own part (its random state) into the one folder the main process renames into place.
    with atomic_folder(target) if main else contextlib.nullcontext(being_written(target)) as folder:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()
        if main:
            # The state file is written last: a folder without it is an unfinished checkpoint.
            write_text_atomic(folder / TRAINER_STATE, json.dumps({"step": step, "seconds": t.clock.seconds()}))
    if main:
        run.prune_checkpoints(t.config.keep_checkpoints)
        log.info("Checkpoint saved: %s", target)
        emit(Event(events.CHECKPOINT, step, t.total_steps, {"path": str(target)}))
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, run: RunFolder) -> tuple[int, float]:
    latest = run.latest_checkpoint()
    if latest is None:
        raise LoraGuiError(f"nothing to resume in {run.path}: it has no complete checkpoint; start a new run instead")
    step, folder = latest
    accelerator.load_state(str(folder))
    state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    log.info("Resumed from %s", folder)
    return step, float(state.get("seconds", 0.0))


def resumed_config(config: TrainConfig, run: RunFolder) -> TrainConfig:
    """A resumed run keeps its saved settings, but for those safe to change mid-run (`CHANGEABLE_ON_RESUME`:
    the length of the run, the learning rate after a divergence, ...), which come from `config`."""
    if not run.config.is_file():
        raise LoraGuiError(f"nothing to resume in {run.path}: it has no config.json; start a new run instead")
    saved = TrainConfig.load(run.config)
    return saved.replace(**{name: getattr(config, name) for name in CHANGEABLE_ON_RESUME})


def apply_changed_settings(t: Training, rates: list[float]) -> None:
    """A checkpoint brings back the optimizer's and the schedule's settings as they were saved: set those a
    resume may have changed (`rates`: each parameter group's learning rate, as the settings give it now; the
    optimizer's own, such as its epsilon or Prodigy's d_coef). What it learned (moments, Prodigy's step size,
    schedule-free's averaging) stays as saved."""
    scheduler, settings = t.lr_scheduler, OPTIMIZERS[t.config.optimizer].settings(t.config)
    for group, rate, factor in zip(t.optimizer.param_groups, rates, scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=rate, lr=rate * factor(scheduler.last_epoch))
        group.update(settings)
    scheduler.base_lrs = list(rates)
    scheduler._last_lr = [group["lr"] for group in t.optimizer.param_groups]


def save_lora(t: Training, step: int) -> list[Path]:
    """The LoRA in diffusers' and kohya's layouts, the record of how far training went that their
    metadata is built from, and the model card."""
    run = t.run
    with t.evaluating():
        if t.accelerator.is_main_process:
            save_diffusers_lora(run.diffusers_lora, t.pipe, t.family)
            record(t, step).save(run.lora_info)
            write_kohya_lora(run)
            write_model_card(run)
    t.accelerator.wait_for_everyone()
    return [run.diffusers_lora, run.kohya_lora, run.model_card]


def record(t: Training, step: int) -> TrainingRecord:
    """How far training went at `step`, for a LoRA file's metadata."""
    return TrainingRecord.now(
        t.family.name,
        t.objective.prediction_type,
        t.config.base_model,
        step,
        t.total_steps,
        t.epochs_done(step),
        t.clock.seconds(),
        t.previews.prompts,
        t.family.variant(t.pipe),
    )
