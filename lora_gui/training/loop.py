"""The training loop: one LoRA on a diffusion model's denoiser (and optionally its text encoders).

Read `_run` top to bottom: `set_up` makes everything the loop needs into one `Training`, then one flat loop whose
phases are batch and loss, backward, step, validate, log, sample, checkpoint. It reports only through events and
files in the run folder, and never touches a UI.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState

from lora_gui import devices, events
from lora_gui.cache import with_references
from lora_gui.config import TrainConfig
from lora_gui.downloads import HubToken
from lora_gui.errors import LoraGuiError
from lora_gui.events import Event, EventHandler
from lora_gui.families import ImageGeometry
from lora_gui.model_policy import ANY_BASE_MODEL, BaseModelPolicy
from lora_gui.runs import TRAINER_STATE, RunFolder
from lora_gui.training.checkpoints import save_checkpoint, save_lora
from lora_gui.training.messages import Stopped, log_to, user_error
from lora_gui.training.setup import Training, any_process, set_up
from lora_gui.training.validation import ending, validate

log = logging.getLogger(__name__)


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_event: EventHandler | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    hub_token: HubToken = None,
    model_policy: BaseModelPolicy = ANY_BASE_MODEL,
) -> Path | None:
    """Train a LoRA into `run_dir` and return the path of the diffusers LoRA file.

    `hub_token` is a Hugging Face token for downloading the base model (a gated one); it is used for that
    download only, and is never written anywhere (it is no setting, so not in config.json). `model_policy` is
    which base models this server takes (a public Space: Hub ids only, never its own files).

    A stop request ends the run after the current step with a checkpoint and a usable LoRA
    (None if it came before the first step).

    Every failure a user can cause ends in a `failed` event and a LoraGuiError with a plain
    message; the traceback goes to the run's train.log.
    """
    run = RunFolder(Path(run_dir))
    run.path.mkdir(parents=True, exist_ok=True)
    # Under `accelerate launch` every process runs this; only the main one reports and logs.
    # Without CUDA, cpu=True is what makes several launched processes one gloo group.
    state = PartialState(cpu=not devices.has_cuda())
    main = state.is_main_process

    def emit(event: Event) -> None:
        if on_event is not None and main:
            on_event(event)

    with log_to(run.log if main else None):
        try:
            return _run(config, run, resume, emit, should_stop, hub_token, model_policy)
        except Stopped as stop:
            log.info("Stopped at step %d of %d", stop.step, stop.total_steps)
            saved = {"lora": stop.lora, "checkpoint": stop.checkpoint}
            emit(Event(events.STOPPED, stop.step, stop.total_steps, {k: v and str(v) for k, v in saved.items()}))
            return stop.lora
        except Exception as error:
            failure = user_error(error, config, run)
            if isinstance(error, LoraGuiError):
                log.error("Training failed: %s", failure)
            else:
                log.exception("Training failed: %s", failure)
            emit(Event(events.FAILED, data={"message": str(failure), "log": str(run.log)}))
            # The traceback holds the loop's frames, and with them the model: drop it so the memory
            # (the GPU's, after an out-of-memory error) is free for the next run. train.log has it.
            error.__traceback__ = None
            raise failure.with_traceback(None) from None
        finally:
            if state.num_processes == 1:
                # Accelerate keeps its settings process-wide; the app's next run may use other ones.
                AcceleratorState._reset_state(reset_partial_state=True)
            devices.free_memory()


def _run(
    config: TrainConfig,
    run: RunFolder,
    resume: bool,
    emit: EventHandler,
    should_stop: Callable[[], bool],
    hub_token: HubToken,
    model_policy: BaseModelPolicy,
) -> Path:
    t = set_up(config, run, resume, emit, should_stop, hub_token, model_policy)
    config, accelerator = t.config, t.accelerator
    window = MetricsWindow(accelerator.device)
    ended = t.total_steps  # earlier when the validation loss stops improving (early_stop)
    for step in range(t.start_step + 1, t.total_steps + 1):
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(*t.models):
                # Batch and loss: this micro-batch's images, noise and timesteps, the prediction and its loss.
                loss = _loss(t, _micro_batch(t, step, micro))
                # Backward (accelerate scales for fp16 and averages over accumulated batches).
                accelerator.backward(loss)
                window.add(loss)
                step_loss += loss.detach()

        # Step: clip the real gradients (a list, not a spent generator); a loss or gradient that is no number
        # any more ends the run before it reaches the LoRA; update, schedule.
        grad_norm = accelerator.clip_grad_norm_(t.params, config.max_grad_norm) if config.max_grad_norm else None
        if _diverged(t, step_loss, grad_norm):
            _stop_diverged(t, step, emit)
        t.optimizer.step()
        t.lr_scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        window.steps += 1

        # Validate on its schedule: the held-out pictures' loss at fixed noise and timesteps; a new best is kept.
        val_loss = validate(t, step)

        # Log: one metrics line and one event per `log_every` steps (one GPU sync each), and at each validation.
        if step % config.log_every == 0 or step == t.total_steps or val_loss is not None:
            _log_step(t, step, window, grad_norm, emit, val_loss)

        # Sample and checkpoint on their schedules; every process reads the same stop flag once a step. A validation
        # loss that stopped improving (early_stop) ends the run here as a finished one.
        stop = any_process(accelerator, should_stop())
        if val_loss is not None and t.curve.stalled(config.early_stop):
            ended = step
        last = step == ended
        if config.sample_every and step % config.sample_every == 0 and not last and not stop:
            with t.evaluating():
                t.previews.make(step, t.total_steps)
        if stop or last or (config.checkpoint_every and step % config.checkpoint_every == 0):
            save_checkpoint(t, step, emit)
        if stop:
            raise Stopped(step, t.total_steps, save_lora(t, step)[0], run.checkpoint(step))
        if last:
            break

    # Finish: previews of the final LoRA, then the LoRA files.
    return _finish(t, ended, emit)


def _finish(t: Training, ended: int, emit: EventHandler) -> Path:
    """Previews of the final LoRA (step `ended`), the LoRA files, and the `finished` event saying where they are."""
    with t.evaluating():
        t.previews.make(ended, t.total_steps)
    files = save_lora(t, ended)
    files += [t.run.best_lora] if t.run.best_lora.is_file() else []
    message = ending(t, ended)
    log.info("Finished %d steps; LoRA saved to %s%s", ended, files[0], f". {message}" if message else "")
    saved = {"lora": str(files[0]), "files": [str(f) for f in files], "message": message}
    emit(Event(events.FINISHED, ended, t.total_steps, saved))
    return files[0]


# ---- one step ------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    latents: torch.Tensor  # the clean latents, scaled for the denoiser
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    captions: list[str]  # "" where the caption was dropped
    geometry: list[ImageGeometry]
    references: torch.Tensor | None  # an edit pair's "before" pictures, scaled for the denoiser; None: no pairs


def _micro_batch(t: Training, step: int, micro: int) -> MicroBatch:
    """Which images, which way round, their captions, noise and timesteps, from random streams that
    depend only on (seed, position in the run): which is why a resumed run continues exactly."""
    accelerator, config = t.accelerator, t.config
    position = ((step - 1) * config.gradient_accumulation_steps + micro) * accelerator.num_processes
    position += accelerator.process_index
    indices = t.order(position)
    choices, rng = _generators(config.seed, position, accelerator.device)
    flips = [bool(flip) and t.latents.has_flips for flip in torch.rand(len(indices), generator=choices) < 0.5]
    latents = t.latents.sample(indices, flips, rng)
    # Noise (optionally offset) and a timestep per image, as the family's objective draws them.
    noise = torch.randn(latents.shape, generator=rng, device=rng.device)
    if config.noise_offset:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=rng, device=rng.device)
        noise = noise + config.noise_offset * offset
    timesteps = t.objective.timesteps(len(indices), rng)
    dropped = (torch.rand(len(indices), generator=choices) < config.caption_dropout).tolist()
    return MicroBatch(
        latents=latents,
        noise=noise,
        timesteps=timesteps,
        noisy=t.objective.noisy(latents, noise, timesteps),
        captions=["" if drop else t.captions[i] for i, drop in zip(indices, dropped, strict=True)],
        geometry=[t.latents.geometry[i] for i in indices],
        references=t.latents.reference(indices, flips, rng.device),
    )


def _loss(t: Training, batch: MicroBatch) -> torch.Tensor:
    """The denoiser's prediction, in the base's precision, against the objective's target (the noise,
    or the velocity for v-prediction)."""
    with devices.autocast(t.accelerator.device, t.precision):
        conditioning = with_references(t.text(batch.captions), batch.references)
        prediction = t.family.predict(t.models[0], batch.noisy, batch.timesteps, conditioning, batch.geometry)
    target = t.objective.target(batch.latents, batch.noise, batch.timesteps)
    return t.objective.loss(prediction, target, batch.timesteps)


def _generators(seed: int, position: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Random streams for one micro-batch: small choices on the CPU (no GPU sync), noise on the device."""
    cpu_seed, device_seed = np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint64)
    return (
        torch.Generator().manual_seed(int(cpu_seed)),
        torch.Generator(device=device).manual_seed(int(device_seed)),
    )


# ---- logging and divergence ----------------------------------------------------------------------
class MetricsWindow:
    """The losses and time since the last metrics line: summed on the device, read once per line."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.losses, self.steps, self.started = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.losses += 1

    def close(self, accelerator: Accelerator, images_per_step: int) -> tuple[float, float]:
        """The mean loss over every process, and images per second; then a new window starts."""
        mean_loss = accelerator.reduce(self.loss_sum / max(self.losses, 1), "mean").item()
        elapsed = time.perf_counter() - self.started
        speed = self.steps * images_per_step / elapsed if elapsed > 0 else 0.0
        self.loss_sum.zero_()
        self.losses, self.steps, self.started = 0, 0, time.perf_counter()
        return mean_loss, speed


def _log_step(
    t: Training,
    step: int,
    window: MetricsWindow,
    grad_norm: torch.Tensor | None,
    emit: EventHandler,
    val_loss: float | None = None,
) -> None:
    """A metrics line and a step event, with the validation loss measured at this step if one was."""
    images_per_step = t.config.batch_size * t.batches_per_step
    mean_loss, speed = window.close(t.accelerator, images_per_step)
    row = {
        "step": step,
        "loss": round(mean_loss, 6),
        "lr": t.lr_scheduler.get_last_lr()[0],
        # fp16's scaler skips the steps whose gradients overflowed (their norm is infinite): JSON has no infinity.
        "grad_norm": None if grad_norm is None or not math.isfinite(norm := float(grad_norm)) else round(norm, 6),
        "epoch": round(t.epochs_done(step), 3),
        "images_per_second": round(speed, 3),
        "seconds": round(t.clock.seconds(), 2),
        **({"val_loss": val_loss, "best_step": t.curve.best[0]} if val_loss is not None else {}),
    }
    if t.accelerator.is_main_process:
        t.run.append_metrics(row)
    eta = (t.total_steps - step) * images_per_step / speed if speed else None
    emit(Event(events.STEP, step, t.total_steps, {**row, "eta_seconds": eta}))


def _diverged(t: Training, step_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """Whether this step's loss or gradients stopped being numbers, in any process (one GPU sync a step).

    Under fp16, accelerate's gradient scaler skips a step whose gradients overflowed and lowers its scale:
    that is how it finds its scale, so there only the loss counts."""
    finite = torch.isfinite(step_loss)
    if grad_norm is not None and t.accelerator.scaler is None:
        finite &= torch.isfinite(grad_norm)
    return any_process(t.accelerator, not bool(finite))


def _stop_diverged(t: Training, step: int, emit: EventHandler) -> None:
    """End a run whose step `step` diverged, before the step reaches the LoRA: the weights are still those of
    the step before, so a checkpoint and the LoRA files are saved there and the run can resume."""
    good = step - 1
    if good > t.start_step:
        if not (t.run.checkpoint(good) / TRAINER_STATE).is_file():  # unless its checkpoint was just saved
            save_checkpoint(t, good, emit)
        save_lora(t, good)
    kept = f"the LoRA and a checkpoint of step {good} are saved" if good > 0 else "nothing was trained yet"
    precision = " or use bf16 instead of fp16," if t.precision == "fp16" else ""
    raise LoraGuiError(
        f"the loss or its gradients stopped being numbers (NaN or infinite) at step {step}: training diverged. "
        f"Lower the learning rate,{precision} and resume ({kept})"
    )
