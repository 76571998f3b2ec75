"""The training loop: one LoRA on a diffusion model's UNet (and optionally its text encoders).

Read `_run` top to bottom: data, model, LoRA, caches, optimizer, resume, then one flat loop whose
phases are batch, noise, forward, loss, backward, step, log, sample, checkpoint. It reports only
through events and files in the run folder, and never touches a UI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers import DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from peft import LoraConfig, inject_adapter_in_model

from lora_gui import data, devices, events
from lora_gui.cache import TextConditioning, cache_latents
from lora_gui.config import TrainConfig
from lora_gui.errors import ConfigError, LoraGuiError, OutOfMemoryError
from lora_gui.events import Event, EventHandler
from lora_gui.export import TrainingRecord, write_kohya_lora
from lora_gui.families import Family
from lora_gui.files import atomic_path, write_text_atomic
from lora_gui.hub import write_model_card
from lora_gui.infer import decode
from lora_gui.lora_files import load_trained_lora, save_diffusers_lora
from lora_gui.models import load_pipeline
from lora_gui.runs import TRAINER_STATE, RunFolder

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
) -> Path | None:
    """Train a LoRA into `run_dir` and return the path of the diffusers LoRA file.

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
            return _run(config, run, resume, emit, should_stop)
        except Stopped as stop:
            log.info("Stopped at step %d of %d", stop.step, stop.total_steps)
            emit(
                Event(
                    events.STOPPED,
                    stop.step,
                    stop.total_steps,
                    {
                        "lora": str(stop.lora) if stop.lora else None,
                        "checkpoint": str(stop.checkpoint) if stop.checkpoint else None,
                    },
                )
            )
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
    config: TrainConfig, run: RunFolder, resume: bool, emit: EventHandler, should_stop: Callable[[], bool]
) -> Path:
    started_at = time.perf_counter()
    if resume:
        config = _resumed_config(config, run)
    elif run.latest_checkpoint():
        raise LoraGuiError(
            f"{run.path} already holds a run (trained to step {run.latest_checkpoint()[0]}): resume it, "
            "or pick a new run name so nothing is overwritten"
        )
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
    main = accelerator.is_main_process
    log.info(
        "Run %s on %s, %d process(es), precision %s",
        run.name,
        accelerator.device,
        accelerator.num_processes,
        accelerator.mixed_precision,
    )

    # Data: the usable images (with captions) in the run's own dataset/, written once, before any resume.
    emit(Event(events.MESSAGE, data={"text": "Checking images"}))
    skipped = data.prepare_run_dataset(config, run) if main and not resume else []
    if main:
        config.save(run.config)
    accelerator.wait_for_everyone()
    examples = data.scan_folder(run.dataset).examples
    data.Scan(examples=examples).require_some(str(run.dataset))

    # Model: the frozen base in the training precision; the VAE stays fp32.
    emit(Event(events.MESSAGE, data={"text": f"Loading {config.base_model}"}))
    family, pipe = load_pipeline(config.base_model, config.family, devices.DTYPES[precision])
    text_encoders = family.text_encoders(pipe)
    # The encoders go to the device now; the UNet only once they are done and parked, so a GPU never
    # holds both.
    for module in (pipe.unet, pipe.vae, *text_encoders):
        module.requires_grad_(False)
    offload = devices.Offload(accelerator.device)
    offload.bring(pipe.vae, *text_encoders)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # for previews

    # LoRA: peft adapters on the UNet (and text encoders), trained in fp32 whatever the base's dtype.
    param_groups = _add_lora(pipe, family, config)
    params = [param for group in param_groups for param in group["params"]]
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if config.train_text_encoder:
        for encoder in text_encoders:
            # Training mode, as diffusers' scripts set it: transformers checkpoints a layer only in it.
            encoder.train()
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in text_encoders:
                encoder.activation_checkpointing_enable()

    # Caches: latents of every image and embeddings of every caption, computed once.
    buckets = data.assign_buckets(examples, config.resolution, _bucket_step(pipe), config.aspect_buckets)
    emit(Event(events.MESSAGE, data={"text": f"Encoding {len(examples)} images"}))

    def caching_progress(done: int, total: int) -> None:
        if _any_process(accelerator, should_stop()):
            raise Stopped
        emit(Event(events.MESSAGE, data={"text": f"Encoding images {done}/{total}"}))

    latents = cache_latents(pipe, examples, buckets, config.random_flip, accelerator.device, caching_progress)
    # Decoding finds damage the header checks can't see (a cut-off file whose end looked whole): those are left out.
    examples, buckets = latents.keep(examples), latents.keep(buckets)
    skipped += [str(each) for each in latents.skipped]
    captions = [data.full_caption(example.caption, config.trigger_word) for example in examples]
    # Frozen text encoders encode each caption (and the empty one, for dropout) once, now.
    text = None if config.train_text_encoder else TextConditioning(pipe, family, accelerator.device, [*captions, ""])
    order = data.BatchOrder(buckets, config.batch_size, config.seed)
    # The VAE and frozen text encoders are done until the previews: park them in CPU memory.
    offload.park(pipe.vae, *([] if config.train_text_encoder else text_encoders))
    offload.bring(pipe.unet)

    # Optimizer and learning-rate schedule, in optimizer steps.
    total_steps = config.total_steps(order.batches_per_epoch, accelerator.num_processes)
    optimizer = _optimizer(param_groups, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps
    )
    trained = [pipe.unet, *(text_encoders if config.train_text_encoder else [])]
    unet, *trained_encoders, optimizer = accelerator.prepare(*trained, optimizer)
    # Trained text encoders encode every batch anew, called as prepared: under several processes that is
    # the wrapper that averages their gradients across processes.
    text = text or TextConditioning(pipe, family, accelerator.device, encoders=trained_encoders)
    accelerator.register_for_checkpointing(lr_scheduler)
    _checkpoint_lora_only(accelerator, pipe, family)

    # Resume: LoRA, optimizer, scheduler and RNG from the latest checkpoint.
    start_step, seconds_before = 0, 0.0
    if resume:
        start_step, seconds_before = _load_checkpoint(accelerator, run)
        if main:
            run.truncate_metrics(start_step)
    elif main:
        run.truncate_metrics(0)
        write_text_atomic(run.path / "data_report.json", json.dumps({"skipped": skipped}, indent=2))

    emit(
        Event(
            events.STARTED,
            start_step,
            total_steps,
            {
                "run_dir": str(run.path),
                "images": len(examples),
                "skipped": skipped,
                "family": family.name,
                "device": str(accelerator.device),
                "precision": accelerator.mixed_precision,
                "resumed_from": start_step if resume else None,
            },
        )
    )
    log.info(
        "Training %d steps on %d images (%d batches per epoch)", total_steps, len(examples), order.batches_per_epoch
    )

    sample_prompts = [p for p in config.sample_prompts if p.strip()] or captions[:1]
    previews = Previews(accelerator, pipe, family, config, run, sample_prompts, offload, emit)
    prediction_type = noise_scheduler.config.prediction_type
    batches_per_step = config.gradient_accumulation_steps * accelerator.num_processes
    images_per_step = config.batch_size * batches_per_step

    def epochs_done(step: int) -> float:
        return step * batches_per_step / order.batches_per_epoch

    def progress(step: int) -> TrainingRecord:
        """How far training went, as the LoRA files' metadata tells it."""
        seconds = seconds_before + time.perf_counter() - started_at
        return TrainingRecord.now(
            family, prediction_type, config.base_model, step, total_steps, epochs_done(step), seconds, sample_prompts
        )

    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count, window_start, window_steps = 0, time.perf_counter(), 0
    for step in range(start_step + 1, total_steps + 1):
        for micro in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(unet, *trained_encoders):
                # Batch: which images, which way round, and a generator that makes this
                # micro-batch's randomness depend only on (seed, position in the run).
                position = ((step - 1) * config.gradient_accumulation_steps + micro) * accelerator.num_processes
                position += accelerator.process_index
                indices = order(position)
                choices, rng = _generators(config.seed, position, accelerator.device)
                flips = [bool(flip) and latents.has_flips for flip in torch.rand(len(indices), generator=choices) < 0.5]
                model_input = latents.sample(indices, flips, rng)

                # Noise: a random timestep per image, optionally offset noise.
                noise = torch.randn(model_input.shape, generator=rng, device=rng.device)
                if config.noise_offset:
                    offset = torch.randn((*model_input.shape[:2], 1, 1), generator=rng, device=rng.device)
                    noise = noise + config.noise_offset * offset
                timesteps = torch.randint(
                    0,
                    noise_scheduler.config.num_train_timesteps,
                    (len(indices),),
                    generator=rng,
                    device=rng.device,
                )
                noisy = noise_scheduler.add_noise(model_input, noise, timesteps)

                # Forward, in the base's precision: captions (some dropped), then the UNet's prediction.
                dropped = (torch.rand(len(indices), generator=choices) < config.caption_dropout).tolist()
                batch_captions = ["" if drop else captions[i] for i, drop in zip(indices, dropped, strict=True)]
                with devices.autocast(accelerator.device, precision):
                    conditioning = text(batch_captions)
                    geometry = [latents.geometry[i] for i in indices]
                    kwargs = family.unet_kwargs(conditioning, geometry, accelerator.device)
                    prediction = unet(noisy, timesteps, **kwargs, return_dict=False)[0]

                # Loss: against the noise (epsilon) or the velocity (v-prediction), min-SNR weighted.
                if prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                else:
                    target = noise
                loss = diffusion_loss(prediction, target, timesteps, noise_scheduler, config.snr_gamma)

                # Backward (accelerate scales for fp16 and averages over accumulated batches).
                accelerator.backward(loss)
                loss_sum += loss.detach()
                loss_count += 1

        # Step: clip the real gradients (a list, not a spent generator), update, schedule.
        grad_norm = None
        if config.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_steps += 1

        # Log: one metrics line and one event per `log_every` steps (one GPU sync each).
        if step % config.log_every == 0 or step == total_steps:
            mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), "mean").item()
            elapsed = time.perf_counter() - window_start
            speed = window_steps * images_per_step / elapsed if elapsed > 0 else 0.0
            row = {
                "step": step,
                "loss": round(mean_loss, 6),
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "epoch": round(epochs_done(step), 3),
                "images_per_second": round(speed, 3),
                "seconds": round(seconds_before + time.perf_counter() - started_at, 2),
            }
            if main:
                run.append_metrics(row)
            eta = (total_steps - step) * images_per_step / speed if speed else None
            emit(Event(events.STEP, step, total_steps, {**row, "eta_seconds": eta}))
            loss_sum.zero_()
            loss_count, window_start, window_steps = 0, time.perf_counter(), 0
            if not math.isfinite(mean_loss):
                raise LoraGuiError(
                    f"the loss became {mean_loss} at step {step}: training diverged. Lower the learning "
                    "rate, or use bf16 instead of fp16; the last checkpoint stays resumable"
                )

        # Sample and checkpoint on their schedules; the stop flag is read once per step, by every process alike.
        stop = _any_process(accelerator, should_stop())
        if config.sample_every and step % config.sample_every == 0 and step < total_steps and not stop:
            previews.make(step, total_steps)
        if stop or step == total_steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
            _save_checkpoint(
                accelerator, run, step, seconds_before + time.perf_counter() - started_at, config, total_steps, emit
            )
        if stop:
            lora = _save_lora(accelerator, pipe, family, run, progress(step))[0]
            raise Stopped(step, total_steps, lora, run.checkpoint(step))

    # Finish: previews of the final LoRA, then the LoRA files.
    previews.make(total_steps, total_steps)
    files = _save_lora(accelerator, pipe, family, run, progress(total_steps))
    log.info("Finished %d steps; LoRA saved to %s", total_steps, files[0])
    emit(Event(events.FINISHED, total_steps, total_steps, {"lora": str(files[0]), "files": [str(f) for f in files]}))
    return files[0]


# ---- the pieces the loop calls -----------------------------------------------------------------
def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    snr_gamma: float,
) -> torch.Tensor:
    """Mean squared error, optionally min-SNR-gamma weighted per image (Hang et al. 2023)."""
    if not snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights).mean()


def _add_lora(pipe: DiffusionPipeline, family: type[Family], config: TrainConfig) -> list[dict]:
    """Inject the adapters; return the optimizer's parameter groups (fp32), text encoders at their own rate."""
    unet_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        init_lora_weights="gaussian",
    )
    try:
        pipe.unet.add_adapter(unet_config)
    except ValueError as error:
        raise ConfigError(f"target_modules {config.target_modules} match no UNet layer ({error})") from None
    cast_training_params(pipe.unet, dtype=torch.float32)
    groups = [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": config.learning_rate}]
    if config.train_text_encoder:
        text_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha,
            target_modules=config.text_encoder_target_modules,
            init_lora_weights="gaussian",
        )
        for name in family.text_encoder_names:
            # transformers 5's add_adapter demands an unreleased peft; peft injects directly.
            encoder = getattr(pipe, name)
            inject_adapter_in_model(text_config, encoder, adapter_name="default")
            encoder.peft_config = {"default": text_config}
            cast_training_params(encoder, dtype=torch.float32)
            groups.append(
                {
                    "params": [p for p in encoder.parameters() if p.requires_grad],
                    "lr": config.text_encoder_learning_rate or config.learning_rate,
                }
            )
    return groups


def _optimizer(param_groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "8-bit AdamW needs the bitsandbytes package: run `pip install bitsandbytes` (NVIDIA GPUs only), "
                "or choose the adamw optimizer"
            ) from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # The fused kernel updates every tensor in one pass, on a GPU and on a CPU alike: on the tiny model's
    # CPU step it takes half the time of the foreach one (0.40 against 0.87 ms, gradient clipping included).
    return torch.optim.AdamW(param_groups, **kwargs, fused=True)


def _generators(seed: int, position: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Random streams for one micro-batch: small choices on the CPU (no GPU sync), noise on the device."""
    cpu_seed, device_seed = np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint64)
    return (
        torch.Generator().manual_seed(int(cpu_seed)),
        torch.Generator(device=device).manual_seed(int(device_seed)),
    )


def _bucket_step(pipe: DiffusionPipeline) -> int:
    """Bucket sides must survive the VAE's and the UNet's downsampling: 64 px for SD, less for tiny models."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return vae_factor * unet_factor


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


def _save_checkpoint(
    accelerator: Accelerator,
    run: RunFolder,
    step: int,
    seconds: float,
    config: TrainConfig,
    total: int,
    emit: EventHandler,
) -> None:
    """Full training state (LoRA, optimizer, scheduler, RNG) into checkpoints/step-N, atomically."""
    target = run.checkpoint(step)
    tmp = target.with_name(f".{target.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file is written last: a folder without it is an unfinished checkpoint.
        write_text_atomic(tmp / TRAINER_STATE, json.dumps({"step": step, "seconds": seconds}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        run.prune_checkpoints(config.keep_checkpoints)
        log.info("Checkpoint saved: %s", target)
        emit(Event(events.CHECKPOINT, step, total, {"path": str(target)}))
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
    """A resumed run keeps its saved settings; only the length of the run may change."""
    if not run.config.is_file():
        raise LoraGuiError(f"nothing to resume in {run.path}: it has no config.json; start a new run instead")
    saved = TrainConfig.load(run.config)
    return saved.replace(max_steps=config.max_steps, epochs=config.epochs)


def _save_lora(
    accelerator: Accelerator, pipe: DiffusionPipeline, family: type[Family], run: RunFolder, record: TrainingRecord
) -> list[Path]:
    """The LoRA in diffusers' and kohya's layouts, the record their metadata comes from, and the model card."""
    if accelerator.is_main_process:
        save_diffusers_lora(run.diffusers_lora, pipe, family)
        record.save(run.lora_info)
        write_kohya_lora(run)
        write_model_card(run)
    accelerator.wait_for_everyone()
    return [run.diffusers_lora, run.kohya_lora, run.model_card]


@dataclass
class Previews:
    """Preview images for the sample prompts, from a fixed seed so they compare across the run."""

    accelerator: Accelerator
    pipe: DiffusionPipeline
    family: type[Family]
    config: TrainConfig
    run: RunFolder
    prompts: list[str]
    offload: devices.Offload  # the UNet is on the device; the VAE and frozen text encoders wait in CPU memory
    emit: EventHandler

    @torch.no_grad()
    def make(self, step: int, total: int) -> None:
        device, precision = self.accelerator.device, self.accelerator.mixed_precision
        if self.accelerator.is_main_process and self.prompts:
            # One part at a time beside the UNet: the text encoders encode every prompt and go back to CPU
            # memory (SDXL's are 1.6 GB in bf16), the UNet denoises, then the VAE comes for the decoding.
            parked = [encoder for encoder in self.family.text_encoders(self.pipe) if not self.offload.holds(encoder)]
            with self.offload.borrowed(*parked), devices.autocast(device, precision):
                embeddings = [_prompt_embeddings(self.pipe, prompt, device) for prompt in self.prompts]
            with devices.autocast(device, precision):
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
            with self.offload.borrowed(self.pipe.vae):
                images = [decode(self.pipe, each)[0] for each in latents]
            paths = []
            for index, image in enumerate(images):
                path = self.run.samples / f"step-{step}-{index}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(str(path))
            self.emit(Event(events.SAMPLES, step, total, {"paths": paths, "prompts": self.prompts}))
        self.accelerator.wait_for_everyone()


def _prompt_embeddings(pipe: DiffusionPipeline, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding, with guidance, as keyword arguments for calling it without prompts."""
    encoded = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, encoded, strict=False))


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
    """What to change when the GPU runs out of memory, most effective first, fitted to the settings."""
    tips = []
    if config.batch_size > 1:
        tips.append(f"lower the batch size (now {config.batch_size}) and raise gradient accumulation instead")
    if not config.gradient_checkpointing:
        tips.append("turn on gradient checkpointing")
    if config.resolution > 512:
        tips.append(f"lower the resolution (now {config.resolution})")
    if config.optimizer != "adamw8bit":
        tips.append("use 8-bit AdamW")
    if config.train_text_encoder:
        tips.append("stop training the text encoder")
    if config.rank > 16:
        tips.append(f"lower the rank (now {config.rank})")
    tips.append("or pick a low-VRAM preset")
    return "the GPU ran out of memory. To fit: " + "; ".join(tips)
