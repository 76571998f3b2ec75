"""Setting a run up: everything the loop needs, made once into one `Training`. The run's processes and precision,
its own dataset/ and validation pictures, the frozen base, the adapters, the caches (latents, text conditioning,
preview prompts), the optimizer and schedule prepared for the processes, then a fresh start or a resume."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from PIL import Image

from lora_gui import batching, block_swap, data, devices, events, optimizers, quantization, run_dataset
from lora_gui.adapters import add_lora
from lora_gui.base_models import load_pipeline
from lora_gui.cache import LatentCache, TextConditioning, cache_latents
from lora_gui.config import TrainConfig
from lora_gui.downloads import HubToken
from lora_gui.errors import ConfigError, LoraGuiError
from lora_gui.events import Event, EventHandler
from lora_gui.families import REGISTRY, Family, base_for_training
from lora_gui.model_policy import BaseModelPolicy
from lora_gui.objectives import Objective
from lora_gui.runs import RunFolder, ValidationCurve
from lora_gui.training.checkpoints import apply_changed_settings, checkpoint_lora_only, load_checkpoint, resumed_config
from lora_gui.training.messages import Stopped
from lora_gui.training.previews import Previews
from lora_gui.training.validation import drop_best_of_steps_redone

log = logging.getLogger(__name__)


@dataclass
class Training:
    """What the loop works with, made once by `set_up`."""

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

    def evaluating(self) -> AbstractContextManager[None]:
        """The LoRA's weights as they are to be used, around anything that evaluates or saves the LoRA (previews,
        the validation loss, the LoRA files): the optimizer's hook (schedule-free AdamW's averaged weights)."""
        return optimizers.OPTIMIZERS[self.config.optimizer].evaluating(self.optimizer, self.params)


@dataclass
class Clock:
    """Seconds spent training this run, across stops and resumes."""

    before: float = 0.0  # spent before this session, as the checkpoint resumed from recorded it
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


def set_up(
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
        config = resumed_config(config, run)
    elif run.latest_checkpoint():
        raise LoraGuiError(
            f"{run.path} already holds a run (trained to step {run.latest_checkpoint()[0]}): resume it, "
            "or pick a new run name so nothing is overwritten"
        )
    config = _checkpointed_for_block_swap(config, emit)
    accelerator, precision = _accelerator(config)
    log.info(
        "Run %s on %s, %d process(es), precision %s", run.name, accelerator.device, accelerator.num_processes, precision
    )
    examples, skipped = _prepare_data(config, run, resume, accelerator, emit)
    examples, held_out, validation_note = _validation_pictures(config, run, resume, examples, accelerator)
    family, pipe, offload, objective = _load_base(config, precision, accelerator, emit, hub_token, model_policy)
    param_groups = _add_adapters(pipe, family, config, accelerator)
    rates = [group["lr"] for group in param_groups]  # before the schedule sets them to its first step's
    caches = _build_caches(config, pipe, family, examples, held_out, offload, accelerator, emit, should_stop)

    total_steps = config.total_steps(caches.order.batches_per_epoch, accelerator.num_processes)
    models, optimizer, lr_scheduler = _optimize(config, accelerator, pipe, family, param_groups, total_steps)
    # Trained text encoders encode every batch anew, called as prepared: under several processes that is
    # the wrapper that averages their gradients across processes.
    text = caches.text or TextConditioning(pipe, family, accelerator.device, encoders=models[1:])
    previews = caches.previews(accelerator, pipe, family, config, run, offload, emit)
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
    skipped = run_dataset.prepare_run_dataset(config, run) if main and not resume else []
    if main:
        config.save(run.config)
    accelerator.wait_for_everyone()
    scan = data.scan_folder(run.dataset)
    if run.control.is_dir():  # an edit's pairs: each picture's "before" picture, under its name
        scan = run_dataset.pair_with_controls(scan, run.control)
    scan.require_some(str(run.dataset))
    return scan.examples, skipped


def _pairs_for(family: type[Family], config: TrainConfig, examples: list[data.Example]) -> list[data.Example]:
    """The run's pictures as this model trains on them: an editing model on edit pairs, which it can't do without; a
    text-to-image model on its pictures alone, refusing "before" pictures it was given on purpose (a Hub dataset's
    column it merely found is set aside)."""
    paired = any(example.control is not None for example in examples)
    editors = " or ".join(other.title for other in REGISTRY.values() if other.reference_images)
    if family.reference_images and not family.trains_without_pairs and not paired:
        raise ConfigError(
            f"{family.title} learns edits from before/after pairs: give the before pictures too (control_data: a "
            "folder of them, each named as its after picture; the caption says the edit)"
        )
    if family.reference_images and config.validation_data:
        raise ConfigError("an edit LoRA is validated on pairs held out of yours: set validation_images instead")
    if paired and not family.reference_images:
        if config.control_data or config.control_column:
            raise ConfigError(
                f"this base model is {family.title}, which makes pictures from text alone: before/after pairs train "
                f"an editing model ({editors}). Pick one, or leave control_data empty"
            )
        return [dataclasses.replace(example, control=None) for example in examples]
    return examples


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
        for each in run_dataset.prepare_validation_folder(config, run):
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
    base_model, why = base_for_training(config.base_model)
    emit(Event(events.MESSAGE, data={"text": why or f"Loading {base_model}"}))
    quantization.check_available(config.quantize_base, accelerator.device.type == "cuda")
    family, pipe = load_pipeline(
        base_model,
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


def _add_adapters(
    pipe: DiffusionPipeline, family: type[Family], config: TrainConfig, accelerator: Accelerator
) -> list[dict]:
    """The LoRA adapters and the speed and memory options (block swap last); the optimizer's parameter groups."""
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
    _swap_blocks(config, pipe, family, accelerator)
    return param_groups


def _checkpointed_for_block_swap(config: TrainConfig, emit: EventHandler) -> TrainConfig:
    """The settings with gradient checkpointing on where blocks are swapped, which need it (see block_swap.py), and
    said so: a beginner who asked for the memory of block swap wants its cheaper companion too."""
    if not config.blocks_to_swap or config.gradient_checkpointing:
        return config
    text = "blocks_to_swap needs gradient_checkpointing: it is on for this run"
    log.info(text)
    emit(Event(events.MESSAGE, data={"text": text}))
    return dataclasses.replace(config, gradient_checkpointing=True)


def _swap_blocks(config: TrainConfig, pipe: DiffusionPipeline, family: type[Family], accelerator: Accelerator) -> None:
    """The denoiser's swapped blocks (`blocks_to_swap`), while it waits in CPU memory with its adapters: from here on
    it moves to the device without them."""
    if not config.blocks_to_swap:
        return
    if accelerator.num_processes > 1:
        raise ConfigError("blocks_to_swap works in a run of one process: set it to 0 to train on several GPUs")
    if config.torch_compile:
        raise ConfigError("blocks_to_swap can't be used with torch_compile: turn one of them off")
    if not family.swap_blocks:
        raise ConfigError(
            f"blocks_to_swap works with transformer models; this {family.title} model's "
            "UNet can't swap its blocks: set blocks_to_swap to 0 (gradient_checkpointing and quantize_base save "
            "memory here)"
        )
    denoiser = family.denoiser(pipe)
    block_swap.swap_blocks(denoiser, family.swap_blocks, config.blocks_to_swap, accelerator.device)


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
    edits: list[Image.Image] | None  # an edit run's pictures to edit, one per prompt; None for other runs

    def previews(
        self,
        accelerator: Accelerator,
        pipe: DiffusionPipeline,
        family: type[Family],
        config: TrainConfig,
        run: RunFolder,
        offload: devices.Offload,
        emit: EventHandler,
    ) -> Previews:
        """The run's previews, of the prompts (and pictures to edit) worked out here."""
        return Previews(
            accelerator, pipe, family, config, run, self.prompts, self.prompt_embeddings, offload, emit, self.edits
        )


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
    examples = _pairs_for(family, config, examples)
    buckets = batching.assign_buckets(examples, config.resolution, family.bucket_step(pipe), config.aspect_buckets)
    emit(Event(events.MESSAGE, data={"text": f"Encoding {len(examples)} images"}))

    def progress(done: int, total: int) -> None:
        if any_process(accelerator, should_stop()):
            raise Stopped
        emit(Event(events.MESSAGE, data={"text": f"Encoding images {done}/{total}"}))

    arriving = quantization.stored_bytes(family.denoiser(pipe))  # an int8 weight is one byte, not its dtype's two
    latents = cache_latents(
        family, pipe.vae, examples, buckets, config.random_flip, accelerator.device, progress, arriving
    )
    # Decoding finds damage the header checks can't see (a cut-off file whose end looked whole): those are left
    # out, and `latents.skipped` says why.
    examples, buckets = latents.keep(examples), latents.keep(buckets)
    chosen = set(held_out)
    held_out = [index for index, was in enumerate(latents.kept) if was in chosen]
    offload.park(pipe.vae)
    captions = [data.full_caption(example.caption, config.trigger_word) for example in examples]
    prompts = [p for p in config.sample_prompts if p.strip()] or captions[:1]
    edits = None
    if latents.references is not None:
        prompts, edits = _preview_edits(config, examples, buckets, held_out, captions)
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
    return Caches(latents, captions, text, order, held_out, prompts, prompt_embeddings, edits)


def _preview_edits(
    config: TrainConfig,
    examples: list[data.Example],
    buckets: list[tuple[int, int]],
    held_out: list[int],
    captions: list[str],
) -> tuple[list[str], list[Image.Image]]:
    """An edit run's previews: the "before" pictures of the pairs held out for validation, else of the first pairs,
    one per preview prompt (or one, with its own instruction), each made at its pair's bucket."""
    chosen = [*held_out, *(index for index in range(len(examples)) if index not in set(held_out))]
    given = [prompt for prompt in config.sample_prompts if prompt.strip()]
    chosen = chosen[: max(1, len(given))]
    prompts = [given[number] if given else captions[index] for number, index in enumerate(chosen)]
    edits = []
    for index in chosen:
        before = batching.stretched_before(data.open_image(examples[index].control), examples[index].size)
        edits.append(batching.fit_to_bucket(before, buckets[index])[0])
    return prompts, edits


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
    optimizer = optimizers.build(param_groups, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps
    )
    trained = [family.denoiser(pipe), *(family.text_encoders(pipe) if config.train_text_encoder else [])]
    *models, optimizer = accelerator.prepare(*trained, optimizer)
    optimizer.train()  # schedule-free AdamW starts out evaluating (`Training.evaluating`); the others have no modes
    accelerator.register_for_checkpointing(lr_scheduler)
    checkpoint_lora_only(accelerator, pipe, family)
    return models, optimizer, lr_scheduler


def _start_or_resume(t: Training, resume: bool, skipped: list[str], validation: str, emit: EventHandler) -> None:
    """Load the latest checkpoint (LoRA, optimizer, scheduler, RNG), or record what a new run left out
    (`skipped`, at Start and when caching); start the metrics and the validation curve from there, and say so
    (`validation`: on which pictures, or why on none)."""
    main = t.accelerator.is_main_process
    if resume:
        t.start_step, t.clock.before = load_checkpoint(t.accelerator, t.run)
        apply_changed_settings(t, t.rates)
    elif main:
        t.run.write_skipped(skipped)
    if main:
        t.run.truncate_metrics(t.start_step)
    t.accelerator.wait_for_everyone()
    t.curve = ValidationCurve.from_metrics(t.run.read_metrics())
    if main:
        drop_best_of_steps_redone(t)
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


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether any process raised the flag: processes that disagree about stopping hang in the next
    collective call (a checkpoint's barrier, a gradient all-reduce). One process alone asks nobody."""
    if accelerator.num_processes == 1:
        return flag
    raised = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(raised, reduction="sum").item())
