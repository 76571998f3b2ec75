"""The training loop: one LoRA on a diffusion model's UNet (and optionally its text encoders).

Read `_run` top to bottom: `_set_up` makes everything the loop needs (data, the frozen base, the
adapters, the caches, optimizer and schedule, a fresh start or a resume) into one `Training`, then
one flat loop whose phases are batch and loss, backward, step, log, sample, checkpoint. It reports
only through events and files in the run folder, and never touches a UI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from safetensors import safe_open

from lora_gui import batching, data, devices, events, memory_savers, quantization
from lora_gui.adapters import add_lora, load_trained_lora
from lora_gui.atomic import atomic_path, write_text_atomic
from lora_gui.base_models import load_pipeline
from lora_gui.cache import LatentCache, TextConditioning, cache_latents
from lora_gui.config import CHANGEABLE_ON_RESUME, TrainConfig, optimizer_settings
from lora_gui.downloads import HubToken
from lora_gui.errors import ConfigError, LoraGuiError, OutOfMemoryError
from lora_gui.events import Event, EventHandler
from lora_gui.families import Family, ImageGeometry
from lora_gui.hub import write_model_card
from lora_gui.infer import decode
from lora_gui.lora_files.diffusers_layout import save_diffusers_lora
from lora_gui.lora_files.export import write_kohya_lora
from lora_gui.model_policy import ANY_BASE_MODEL, BaseModelPolicy
from lora_gui.objectives import Objective
from lora_gui.runs import DIFFUSERS_LORA, TRAINER_STATE, RunFolder, TrainingRecord, ValidationCurve

log = logging.getLogger(__name__)


class Stopped(Exception):
    """The user asked the run to stop; carries what was saved by then."""

    def __init__(self, step: int = 0, total_steps: int = 0, lora: Path | None = None, checkpoint: Path | None = None):
        super().__init__("stopped")
        self.step, self.total_steps, self.lora, self.checkpoint = step, total_steps, lora, checkpoint


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

    with _log_to(run.log if main else None):
        try:
            return _run(config, run, resume, emit, should_stop, hub_token, model_policy)
        except Stopped as stop:
            log.info("Stopped at step %d of %d", stop.step, stop.total_steps)
            saved = {"lora": stop.lora, "checkpoint": stop.checkpoint}
            emit(Event(events.STOPPED, stop.step, stop.total_steps, {k: v and str(v) for k, v in saved.items()}))
            return stop.lora
        except Exception as error:
            failure = _user_error(error, config, run)
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
    t = _set_up(config, run, resume, emit, should_stop, hub_token, model_policy)
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
        val_loss = _validate(t, step)

        # Log: one metrics line and one event per `log_every` steps (one GPU sync each), and at each validation.
        if step % config.log_every == 0 or step == t.total_steps or val_loss is not None:
            _log_step(t, step, window, grad_norm, emit, val_loss)

        # Sample and checkpoint on their schedules; every process reads the same stop flag once a step. A validation
        # loss that stopped improving (early_stop) ends the run here as a finished one.
        stop = _any_process(accelerator, should_stop())
        if val_loss is not None and t.curve.stalled(config.early_stop):
            ended = step
        last = step == ended
        if config.sample_every and step % config.sample_every == 0 and not last and not stop:
            with _evaluating(t):
                t.previews.make(step, t.total_steps)
        if stop or last or (config.checkpoint_every and step % config.checkpoint_every == 0):
            _save_checkpoint(t, step, emit)
        if stop:
            raise Stopped(step, t.total_steps, _save_lora(t, step)[0], run.checkpoint(step))
        if last:
            break

    # Finish: previews of the final LoRA, then the LoRA files.
    with _evaluating(t):
        t.previews.make(ended, t.total_steps)
    files = _save_lora(t, ended)
    files += [run.best_lora] if run.best_lora.is_file() else []
    message = _ending(t, ended)
    log.info("Finished %d steps; LoRA saved to %s%s", ended, files[0], f". {message}" if message else "")
    saved = {"lora": str(files[0]), "files": [str(f) for f in files], "message": message}
    emit(Event(events.FINISHED, ended, t.total_steps, saved))
    return files[0]


# ---- setting up: everything the loop needs ------------------------------------------------------
@dataclass
class Training:
    """What the loop works with, made once by `_set_up`."""

    config: TrainConfig
    run: RunFolder
    accelerator: Accelerator
    precision: str  # "no", "fp16" or "bf16": the frozen base's dtype and autocast's
    family: type[Family]
    pipe: DiffusionPipeline
    models: list[torch.nn.Module]  # as prepared: the UNet, then the text encoders when they train
    objective: Objective  # what noise goes on the latents, and what the denoiser predicts
    latents: LatentCache
    captions: list[str]  # each image's caption as trained (trigger word in front)
    text: TextConditioning
    order: batching.BatchOrder
    held_out: list[int]  # the images the validation loss is measured on (never in a batch); empty: no validation
    params: list[torch.nn.Parameter]
    rates: list[float]  # each parameter group's learning rate, as the settings give it
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    previews: Previews
    total_steps: int
    start_step: int
    clock: Clock
    curve: ValidationCurve = field(default_factory=ValidationCurve)  # the validation loss so far, and its best

    @property
    def batches_per_step(self) -> int:
        return self.config.gradient_accumulation_steps * self.accelerator.num_processes

    def epochs_done(self, step: int) -> float:
        return step * self.batches_per_step / self.order.batches_per_epoch


@dataclass
class Clock:
    """Seconds spent training this run, across stops and resumes."""

    before: float = 0.0  # spent before this session, as the checkpoint resumed from recorded it
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


def _set_up(
    config: TrainConfig,
    run: RunFolder,
    resume: bool,
    emit: EventHandler,
    should_stop: Callable[[], bool],
    hub_token: HubToken,
    model_policy: BaseModelPolicy,
) -> Training:
    clock = Clock()
    if resume:
        config = _resumed_config(config, run)
    elif run.latest_checkpoint():
        raise LoraGuiError(
            f"{run.path} already holds a run (trained to step {run.latest_checkpoint()[0]}): resume it, "
            "or pick a new run name so nothing is overwritten"
        )
    accelerator, precision = _accelerator(config)
    log.info(
        "Run %s on %s, %d process(es), precision %s", run.name, accelerator.device, accelerator.num_processes, precision
    )
    examples, skipped = _prepare_data(config, run, resume, accelerator, emit)
    examples, held_out, validation_note = _validation_pictures(config, run, resume, examples, accelerator)
    family, pipe, offload, objective = _load_base(config, precision, accelerator, emit, hub_token, model_policy)
    param_groups = _add_adapters(pipe, family, config)
    rates = [group["lr"] for group in param_groups]  # before the schedule sets them to its first step's
    caches = _build_caches(config, pipe, family, examples, held_out, offload, accelerator, emit, should_stop)

    total_steps = config.total_steps(caches.order.batches_per_epoch, accelerator.num_processes)
    models, optimizer, lr_scheduler = _optimize(config, accelerator, pipe, family, param_groups, total_steps)
    # Trained text encoders encode every batch anew, called as prepared: under several processes that is
    # the wrapper that averages their gradients across processes.
    text = caches.text or TextConditioning(pipe, family, accelerator.device, encoders=models[1:])
    previews = Previews(accelerator, pipe, family, config, run, caches.prompts, caches.prompt_embeddings, offload, emit)
    t = Training(
        config=config,
        run=run,
        accelerator=accelerator,
        precision=precision,
        family=family,
        pipe=pipe,
        models=models,
        objective=objective,
        latents=caches.latents,
        captions=caches.captions,
        text=text,
        order=caches.order,
        held_out=caches.held_out,
        params=[param for group in param_groups for param in group["params"]],
        rates=rates,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        previews=previews,
        total_steps=total_steps,
        start_step=0,
        clock=clock,
    )
    _start_or_resume(t, resume, [*skipped, *map(str, caches.latents.skipped)], validation_note, emit)
    return t


def _accelerator(config: TrainConfig) -> tuple[Accelerator, str]:
    """The run's processes and precision, and its seed set."""
    precision = devices.resolve_precision(config.mixed_precision)
    devices.use_tensor_cores()
    accelerator = Accelerator(
        cpu=not devices.has_cuda(),
        mixed_precision=precision,
        dynamo_backend="inductor" if config.torch_compile else "no",
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # Under several processes: SDXL's first text encoder gives the UNet its next-to-last layer, so the
        # LoRA of its last layer gets no gradient, and DDP must be told not to wait for one.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.train_text_encoder)],
    )
    set_seed(config.seed)
    return accelerator, precision


def _prepare_data(
    config: TrainConfig, run: RunFolder, resume: bool, accelerator: Accelerator, emit: EventHandler
) -> tuple[list[data.Example], list[str]]:
    """The usable images (with captions) in the run's own dataset/, written once, before any resume;
    the run's images and what was skipped."""
    emit(Event(events.MESSAGE, data={"text": "Checking images"}))
    main = accelerator.is_main_process
    skipped = data.prepare_run_dataset(config, run) if main and not resume else []
    if main:
        config.save(run.config)
    accelerator.wait_for_everyone()
    examples = data.scan_folder(run.dataset).examples
    data.Scan(examples=examples).require_some(str(run.dataset))
    return examples, skipped


def _validation_pictures(
    config: TrainConfig, run: RunFolder, resume: bool, examples: list[data.Example], accelerator: Accelerator
) -> tuple[list[data.Example], list[int], str]:
    """The run's images with the validation pictures (held out of them, or after them from the run's own copy of
    `validation_data`), which of them are for validation alone, and a sentence saying so (or why there are
    none). Held-out pictures depend only on the seed and the names in dataset/, so a resume holds out the same."""
    if not config.validation_data:
        held_out, note = batching.hold_out(examples, config.validation_images, config.seed)
        if accelerator.is_main_process:
            run.write_validation(run.dataset, [examples[index].relpath for index in held_out], note)
        return examples, held_out, note
    if accelerator.is_main_process and not resume:
        for each in data.prepare_validation_folder(config, run):
            log.warning("Skipped %s", each)
    accelerator.wait_for_everyone()
    pictures = data.scan_folder(run.validation_pictures).examples
    note = f"Validation on the {len(pictures)} pictures of {config.validation_data}, never trained on"
    if accelerator.is_main_process:
        run.write_validation(run.validation_pictures, [picture.relpath for picture in pictures], note)
    return [*examples, *pictures], list(range(len(examples), len(examples) + len(pictures))), note


def _load_base(
    config: TrainConfig,
    precision: str,
    accelerator: Accelerator,
    emit: EventHandler,
    hub_token: HubToken,
    model_policy: BaseModelPolicy,
) -> tuple[type[Family], DiffusionPipeline, devices.Offload, Objective]:
    """The frozen base in the training precision (the VAE stays fp32; the denoiser quantized if the settings
    say so), with the VAE on the device to encode the pictures, and the family's training objective. A Hub
    model downloads first, reported as `download` events."""
    emit(Event(events.MESSAGE, data={"text": f"Loading {config.base_model}"}))
    quantization.check_available(config.quantize_base, accelerator.device.type == "cuda")
    family, pipe = load_pipeline(
        config.base_model,
        config.family,
        devices.DTYPES[precision],
        config.quantize_base,
        token=hub_token,
        on_progress=lambda progress: emit(Event(events.DOWNLOAD, data=asdict(progress))),
        policy=model_policy,
    )
    text_encoders = family.text_encoders(pipe)
    for module in (family.denoiser(pipe), pipe.vae, *text_encoders):
        module.requires_grad_(False)
    offload = devices.Offload(accelerator.device)
    # A 4-bit base arrives on the GPU (bitsandbytes quantizes it there): it waits in CPU memory while the VAE
    # and the text encoders work, as any denoiser does, so a 12 GB card never holds it beside Flux's T5.
    offload.park(family.denoiser(pipe))
    offload.bring(pipe.vae)
    objective = family.objective(pipe, config.snr_gamma)  # from the base's own scheduler, before it is replaced
    pipe.scheduler = family.preview_scheduler(pipe)
    return family, pipe, offload, objective


def _add_adapters(pipe: DiffusionPipeline, family: type[Family], config: TrainConfig) -> list[dict]:
    """The LoRA adapters and the speed and memory options; the optimizer's parameter groups."""
    param_groups = add_lora(pipe, family, config)
    text_encoders = family.text_encoders(pipe) if config.train_text_encoder else []
    for encoder in text_encoders:
        encoder.train()  # as diffusers' scripts do: transformers checkpoints a layer only in training mode
    denoiser = family.denoiser(pipe)
    if config.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in text_encoders:
            encoder.activation_checkpointing_enable()
    return param_groups


@dataclass
class Caches:
    """What is worked out once before the loop."""

    latents: LatentCache
    captions: list[str]  # of the images that decoded, as trained (trigger word in front)
    text: TextConditioning | None  # every caption's conditioning; None when the text encoders train
    order: batching.BatchOrder
    held_out: list[int]  # the images for validation alone, by their index in the latents
    prompts: list[str]  # the preview prompts
    prompt_embeddings: list[dict[str, torch.Tensor]] | None  # theirs, None when the text encoders train


def _build_caches(
    config: TrainConfig,
    pipe: DiffusionPipeline,
    family: type[Family],
    examples: list[data.Example],
    held_out: list[int],
    offload: devices.Offload,
    accelerator: Accelerator,
    emit: EventHandler,
    should_stop: Callable[[], bool],
) -> Caches:
    """Latents of every image and, for frozen text encoders, embeddings of every caption and preview prompt,
    computed once; then the VAE and frozen encoders wait in CPU memory (the VAE until the previews' decoding,
    the encoders for good), and the denoiser comes. The VAE and the text encoders take turns on the device:
    Flux's T5 alone is 9.5 GB, which a 12 GB card holds only without the VAE's work beside it."""
    buckets = batching.assign_buckets(examples, config.resolution, family.bucket_step(pipe), config.aspect_buckets)
    emit(Event(events.MESSAGE, data={"text": f"Encoding {len(examples)} images"}))

    def progress(done: int, total: int) -> None:
        if _any_process(accelerator, should_stop()):
            raise Stopped
        emit(Event(events.MESSAGE, data={"text": f"Encoding images {done}/{total}"}))

    arriving = quantization.stored_bytes(family.denoiser(pipe))  # an int8 weight is one byte, not its dtype's two
    latents = cache_latents(pipe.vae, examples, buckets, config.random_flip, accelerator.device, progress, arriving)
    # Decoding finds damage the header checks can't see (a cut-off file whose end looked whole): those are left
    # out, and `latents.skipped` says why.
    examples, buckets = latents.keep(examples), latents.keep(buckets)
    chosen = set(held_out)
    held_out = [index for index, was in enumerate(latents.kept) if was in chosen]
    offload.park(pipe.vae)
    captions = [data.full_caption(example.caption, config.trigger_word) for example in examples]
    prompts = [p for p in config.sample_prompts if p.strip()] or captions[:1]
    text, prompt_embeddings = None, None
    if config.train_text_encoder:
        offload.bring(*family.text_encoders(pipe))  # for good: they train beside the denoiser
    else:
        with offload.borrowed(*family.text_encoders(pipe)):  # and the empty caption, for dropout
            text = TextConditioning(pipe, family, accelerator.device, [*captions, ""])
            with torch.no_grad():  # without autocast, as the captions were (see devices.outside_autocast)
                prompt_embeddings = [family.prompt_embeddings(pipe, prompt, accelerator.device) for prompt in prompts]
    offload.bring(family.denoiser(pipe))
    order = batching.BatchOrder(buckets, config.batch_size, config.seed, held_out)
    return Caches(latents, captions, text, order, held_out, prompts, prompt_embeddings)


def _optimize(
    config: TrainConfig,
    accelerator: Accelerator,
    pipe: DiffusionPipeline,
    family: type[Family],
    param_groups: list[dict],
    total_steps: int,
) -> tuple[list[torch.nn.Module], torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and learning-rate schedule, in optimizer steps, and the trained models prepared for
    the processes (the UNet first); accelerate's checkpoints hold the LoRA and the schedule with them."""
    optimizer = _optimizer(param_groups, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps
    )
    trained = [family.denoiser(pipe), *(family.text_encoders(pipe) if config.train_text_encoder else [])]
    *models, optimizer = accelerator.prepare(*trained, optimizer)
    optimizer.train()  # schedule-free AdamW starts out evaluating (`_evaluating`); the others have no modes
    accelerator.register_for_checkpointing(lr_scheduler)
    _checkpoint_lora_only(accelerator, pipe, family)
    return models, optimizer, lr_scheduler


def _start_or_resume(t: Training, resume: bool, skipped: list[str], validation: str, emit: EventHandler) -> None:
    """Load the latest checkpoint (LoRA, optimizer, scheduler, RNG), or record what a new run left out
    (`skipped`, at Start and when caching); start the metrics and the validation curve from there, and say so
    (`validation`: on which pictures, or why on none)."""
    main = t.accelerator.is_main_process
    if resume:
        t.start_step, t.clock.before = _load_checkpoint(t.accelerator, t.run)
        _apply_changed_settings(t, t.rates)
    elif main:
        t.run.write_skipped(skipped)
    if main:
        t.run.truncate_metrics(t.start_step)
    t.accelerator.wait_for_everyone()
    t.curve = ValidationCurve.from_metrics(t.run.read_metrics())
    if main:
        _drop_best_of_steps_redone(t)
    images = len(t.captions) - len(t.held_out)
    info = {
        "run_dir": str(t.run.path),
        "images": images,
        "validation": validation,
        "validation_pictures": len(t.held_out),
        "skipped": skipped,
        "family": t.family.name,
        "device": str(t.accelerator.device),
        "precision": t.precision,
        "resumed_from": t.start_step if resume else None,
    }
    emit(Event(events.STARTED, t.start_step, t.total_steps, info))
    log.info("Training %d steps on %d images (%d batches per epoch)", t.total_steps, images, t.order.batches_per_epoch)


# ---- one step -----------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    latents: torch.Tensor  # the clean latents, scaled for the denoiser
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    captions: list[str]  # "" where the caption was dropped
    geometry: list[ImageGeometry]


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
    )


def _loss(t: Training, batch: MicroBatch) -> torch.Tensor:
    """The denoiser's prediction, in the base's precision, against the objective's target (the noise,
    or the velocity for v-prediction)."""
    with devices.autocast(t.accelerator.device, t.precision):
        conditioning = t.text(batch.captions)
        prediction = t.family.predict(t.models[0], batch.noisy, batch.timesteps, conditioning, batch.geometry)
    target = t.objective.target(batch.latents, batch.noise, batch.timesteps)
    return t.objective.loss(prediction, target, batch.timesteps)


# ---- validation: the loss on pictures never trained on ----------------------------------------------
VALIDATION_TIMESTEPS = 8  # per held-out picture, spread evenly over the schedule


def _validate(t: Training, step: int) -> float | None:
    """Every `validation_every` steps and at the last: the validation loss, recorded on the curve, and a new best
    step's LoRA kept as <name>-best.safetensors. None at other steps, and without validation pictures."""
    config = t.config
    if not t.held_out or (step % config.validation_every and step < t.total_steps):
        return None
    with _evaluating(t):
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
                conditioning = t.text([t.captions[index]] * len(timesteps))
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
            write_kohya_lora(run, run.best_lora, lora=lora, record=_record(t, step), extra=extra)
        log.info("Lowest validation loss so far (%.6f) at step %d: saved %s", loss, step, run.best_lora.name)
    t.accelerator.wait_for_everyone()


def _drop_best_of_steps_redone(t: Training) -> None:
    """A best LoRA saved after the step a run resumes from (it crashed past its last checkpoint) belongs to steps
    about to be trained again: they save it again, exactly, if it is still the best."""
    best = t.run.best_lora
    if not best.is_file():
        return
    with safe_open(str(best), framework="pt") as handle:
        saved_step = (handle.metadata() or {}).get("lora_gui.best_step")
    if t.curve.best is None or saved_step != str(t.curve.best[0]):
        best.unlink()


def _ending(t: Training, ended: int) -> str:
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
    return _any_process(t.accelerator, not bool(finite))


def _stop_diverged(t: Training, step: int, emit: EventHandler) -> None:
    """End a run whose step `step` diverged, before the step reaches the LoRA: the weights are still those of
    the step before, so a checkpoint and the LoRA files are saved there and the run can resume."""
    good = step - 1
    if good > t.start_step:
        if not (t.run.checkpoint(good) / TRAINER_STATE).is_file():  # unless its checkpoint was just saved
            _save_checkpoint(t, good, emit)
        _save_lora(t, good)
    kept = f"the LoRA and a checkpoint of step {good} are saved" if good > 0 else "nothing was trained yet"
    precision = " or use bf16 instead of fp16," if t.precision == "fp16" else ""
    raise LoraGuiError(
        f"the loss or its gradients stopped being numbers (NaN or infinite) at step {step}: training diverged. "
        f"Lower the learning rate,{precision} and resume ({kept})"
    )


# ---- the pieces the loop calls -----------------------------------------------------------------
def _optimizer(param_groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    settings = optimizer_settings(config)
    if config.optimizer == "adamw":
        # The fused kernel updates every tensor in one pass, on a GPU and on a CPU alike: on the tiny model's
        # CPU step it takes half the time of the foreach one (0.40 against 0.87 ms, gradient clipping included).
        settings["fused"] = True
    return _optimizer_class(config.optimizer)(param_groups, **settings)


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "8-bit AdamW needs the bitsandbytes package: run `pip install bitsandbytes` (NVIDIA GPUs only), "
                "or choose the adamw optimizer"
            ) from None
        return bnb.optim.AdamW8bit
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    if name == "adamw-schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    return torch.optim.AdamW


def _generators(seed: int, position: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Random streams for one micro-batch: small choices on the CPU (no GPU sync), noise on the device."""
    cpu_seed, device_seed = np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint64)
    return (
        torch.Generator().manual_seed(int(cpu_seed)),
        torch.Generator(device=device).manual_seed(int(device_seed)),
    )


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether any process raised the flag: processes that disagree about stopping hang in the next
    collective call (a checkpoint's barrier, a gradient all-reduce). One process alone asks nobody."""
    if accelerator.num_processes == 1:
        return flag
    raised = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(raised, reduction="sum").item())


def _checkpoint_lora_only(accelerator: Accelerator, pipe: DiffusionPipeline, family: type[Family]) -> None:
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


def _save_checkpoint(t: Training, step: int, emit: EventHandler) -> None:
    """Full training state (LoRA, optimizer, scheduler, RNG) into checkpoints/step-N, atomically."""
    accelerator, run = t.accelerator, t.run
    target = run.checkpoint(step)
    tmp = target.with_name(f".{target.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file is written last: a folder without it is an unfinished checkpoint.
        write_text_atomic(tmp / TRAINER_STATE, json.dumps({"step": step, "seconds": t.clock.seconds()}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        run.prune_checkpoints(t.config.keep_checkpoints)
        log.info("Checkpoint saved: %s", target)
        emit(Event(events.CHECKPOINT, step, t.total_steps, {"path": str(target)}))
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, run: RunFolder) -> tuple[int, float]:
    latest = run.latest_checkpoint()
    if latest is None:
        raise LoraGuiError(f"nothing to resume in {run.path}: it has no complete checkpoint; start a new run instead")
    step, folder = latest
    accelerator.load_state(str(folder))
    state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    log.info("Resumed from %s", folder)
    return step, float(state.get("seconds", 0.0))


def _resumed_config(config: TrainConfig, run: RunFolder) -> TrainConfig:
    """A resumed run keeps its saved settings, but for those safe to change mid-run (`CHANGEABLE_ON_RESUME`:
    the length of the run, the learning rate after a divergence, ...), which come from `config`."""
    if not run.config.is_file():
        raise LoraGuiError(f"nothing to resume in {run.path}: it has no config.json; start a new run instead")
    saved = TrainConfig.load(run.config)
    return saved.replace(**{name: getattr(config, name) for name in CHANGEABLE_ON_RESUME})


def _apply_changed_settings(t: Training, rates: list[float]) -> None:
    """A checkpoint brings back the optimizer's and the schedule's settings as they were saved: set those a
    resume may have changed (`rates`: each parameter group's learning rate, as the settings give it now; the
    optimizer's own, such as its epsilon or Prodigy's d_coef). What it learned (moments, Prodigy's step size,
    schedule-free's averaging) stays as saved."""
    scheduler, settings = t.lr_scheduler, optimizer_settings(t.config)
    for group, rate, factor in zip(t.optimizer.param_groups, rates, scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=rate, lr=rate * factor(scheduler.last_epoch))
        group.update(settings)
    scheduler.base_lrs = list(rates)
    scheduler._last_lr = [group["lr"] for group in t.optimizer.param_groups]


def _save_lora(t: Training, step: int) -> list[Path]:
    """The LoRA in diffusers' and kohya's layouts, the record of how far training went that their
    metadata is built from, and the model card."""
    run = t.run
    with _evaluating(t):
        if t.accelerator.is_main_process:
            save_diffusers_lora(run.diffusers_lora, t.pipe, t.family)
            _record(t, step).save(run.lora_info)
            write_kohya_lora(run)
            write_model_card(run)
    t.accelerator.wait_for_everyone()
    return [run.diffusers_lora, run.kohya_lora, run.model_card]


@contextlib.contextmanager
def _evaluating(t: Training) -> Iterator[None]:
    """The LoRA's weights as they are to be used, for anything that evaluates or saves the LoRA (previews, the
    validation loss, the LoRA files). Schedule-free AdamW takes its gradients at other weights than those: it
    keeps an average to use, which `eval()` moves the weights to. Back to training, the training weights are put
    back bit for bit, not worked out again from the average (which rounds): so however often a run evaluates,
    what it learns is the same, and a run stopped and resumed learns what one uninterrupted run does. Its
    checkpoints are saved training, so they hold those weights exactly. Other optimizers use what they train."""
    if t.config.optimizer != "adamw-schedulefree":
        yield
        return
    training = [param.detach().clone() for param in t.params]
    t.optimizer.eval()
    try:
        yield
    finally:
        t.optimizer.train()
        with torch.no_grad():
            for param, kept in zip(t.params, training, strict=True):
                param.copy_(kept)


def _record(t: Training, step: int) -> TrainingRecord:
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


@dataclass
class Previews:
    """Preview images for the sample prompts, from a fixed seed so they compare across the run."""

    accelerator: Accelerator
    pipe: DiffusionPipeline
    family: type[Family]
    config: TrainConfig
    run: RunFolder
    prompts: list[str]
    # The prompts' embeddings, made while the frozen text encoders were on the device for caching; None when
    # the text encoders train, which are on the device then and encode the prompts for each set anew.
    embeddings: list[dict[str, torch.Tensor]] | None
    offload: devices.Offload  # the denoiser is on the device; the VAE waits in CPU memory
    emit: EventHandler

    @torch.no_grad()
    def make(self, step: int, total: int) -> None:
        device, precision = self.accelerator.device, self.accelerator.mixed_precision
        if self.accelerator.is_main_process and self.prompts:
            # One part at a time beside the denoiser: it denoises, then the VAE comes for the decoding.
            with devices.autocast(device, precision):
                embeddings = self.embeddings or [
                    self.family.prompt_embeddings(self.pipe, prompt, device) for prompt in self.prompts
                ]
                latents = [
                    self.pipe(
                        **prompt_embeddings,
                        num_inference_steps=self.config.sample_steps,
                        height=self.config.resolution,
                        width=self.config.resolution,
                        generator=torch.Generator(device=device).manual_seed(self.config.sample_seed + index),
                        output_type="latent",
                    ).images
                    for index, prompt_embeddings in enumerate(embeddings)
                ]
            side = self.config.resolution
            with self.offload.borrowed(self.pipe.vae):
                images = [decode(self.family, self.pipe, each, side, side)[0] for each in latents]
            paths = []
            for index, image in enumerate(images):
                path = self.run.samples / f"step-{step}-{index}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(str(path))
            self.emit(Event(events.SAMPLES, step, total, {"paths": paths, "prompts": self.prompts}))
        self.accelerator.wait_for_everyone()


# ---- reporting ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _log_to(path: Path | None) -> Iterator[None]:
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


def _user_error(error: Exception, config: TrainConfig, run: RunFolder) -> LoraGuiError:
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
