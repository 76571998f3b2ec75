"""The validation loss: the loss on pictures never trained on, at fixed noise and timesteps, so its curve moves only
because the LoRA changed; the best step's LoRA kept, and how the run ended in its terms."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lora_gui import devices
from lora_gui.cache import with_references
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora
from lora_gui.lora_files.export import write_kohya_lora
from lora_gui.runs import DIFFUSERS_LORA
from lora_gui.training.checkpoints import record

if TYPE_CHECKING:
    from lora_gui.training.setup import Training

log = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = 8  # per held-out picture, spread evenly over the schedule


def validate(t: Training, step: int) -> float | None:
    """Every `validation_every` steps and at the last: the validation loss, recorded on the curve, and a new best
    step's LoRA kept as <name>-best.safetensors. None at other steps, and without validation pictures."""
    config = t.config
    if not t.held_out or (step % config.validation_every and step < t.total_steps):
        return None
    with t.evaluating():
        # Rounded as metrics.jsonl keeps it, so a resumed run's curve, rebuilt from there, finds the same best.
        loss = round(_validation_loss(t), 6)
        if t.curve.add(step, loss) and config.keep_best:
            _save_best(t, step, loss)
    return loss


@torch.no_grad()
def _validation_loss(t: Training) -> float:
    """The held-out pictures' mean loss, each as it is (no draw from its latent distribution, no flip, its full
    caption) at the objective's evaluation timesteps, with noise from a fixed seed and a plain mean squared error:
    two measurements differ only because the LoRA changed. Every process measures all of them (the denoiser is
    called as prepared, as in training) and takes the mean, so all make the same early-stop decision. The denoiser
    sees at most a training batch at a time, so measuring never needs more memory than a step."""
    device = t.accelerator.device
    every_timestep = t.objective.evaluation_timesteps(VALIDATION_TIMESTEPS, device)
    losses = []
    for index in t.held_out:
        picture = t.latents.centre(index, device)
        generator = _validation_generator(t.config.seed, index, device)
        all_noise = torch.randn((len(every_timestep), *picture.shape[1:]), generator=generator, device=device)
        for start in range(0, len(every_timestep), t.config.batch_size):
            chunk = slice(start, start + t.config.batch_size)
            timesteps, noise = every_timestep[chunk], all_noise[chunk]
            latents = picture.expand(len(timesteps), -1, -1, -1)
            noisy, geometry = t.objective.noisy(latents, noise, timesteps), [t.latents.geometry[index]] * len(noise)
            with devices.autocast(device, t.precision):
                references = t.latents.reference([index] * len(timesteps), [False] * len(timesteps), device)
                conditioning = with_references(t.text([t.captions[index]] * len(timesteps)), references)
                prediction = t.family.predict(t.models[0], noisy, timesteps, conditioning, geometry)
            target = t.objective.target(latents, noise, timesteps)
            losses.append(F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1))
    return t.accelerator.reduce(torch.cat(losses).mean(), "mean").item()


def _validation_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The noise of held-out image `index`: the same at every measurement, and in every run with this seed (a
    stream of its own, apart from the training batches')."""
    (state,) = np.random.SeedSequence([seed, index], spawn_key=(1,)).generate_state(1, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state))


def _save_best(t: Training, step: int, loss: float) -> None:
    """The LoRA as it is now, the best so far, as <name>-best.safetensors in kohya's layout, its metadata naming
    the step (ss_steps, lora_gui.best_step) and its validation loss."""
    run = t.run
    if t.accelerator.is_main_process:
        with tempfile.TemporaryDirectory(prefix=".best-", dir=run.path) as folder:
            lora = save_diffusers_lora(Path(folder) / DIFFUSERS_LORA, t.pipe, t.family)
            extra = {"lora_gui.best_step": str(step), "lora_gui.validation_loss": str(loss)}
            write_kohya_lora(run, run.best_lora, lora=lora, record=record(t, step), extra=extra)
        log.info("Lowest validation loss so far (%.6f) at step %d: saved %s", loss, step, run.best_lora.name)
    t.accelerator.wait_for_everyone()


def drop_best_of_steps_redone(t: Training) -> None:
    """A best LoRA saved after the step a run resumes from (it crashed past its last checkpoint) belongs to steps
    about to be trained again: they save it again, exactly, if it is still the best."""
    best = t.run.best_lora
    if not best.is_file():
        return
    with safe_open(str(best), framework="pt") as handle:
        saved_step = (handle.metadata() or {}).get("lora_gui.best_step")
    if t.curve.best is None or saved_step != str(t.curve.best[0]):
        best.unlink()


def ending(t: Training, ended: int) -> str:
    """How the run ended, in words: where the validation loss was lowest, and why it stopped early if it did."""
    if t.curve.best is None:
        return ""
    step, loss = t.curve.best
    kept = f", kept as {t.run.best_lora.name}" if t.config.keep_best else ""
    lowest = f"Lowest validation loss {loss:.4f} at step {step}{kept}."
    if ended == t.total_steps:
        return lowest
    return (
        f"Stopped early at step {ended} of {t.total_steps}: the validation loss did not improve for "
        f"{t.config.early_stop} measurements in a row. {lowest}"
    )
