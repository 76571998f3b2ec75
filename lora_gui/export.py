"""A run's LoRA in each layout other tools load, with the metadata they read.

Everything the kohya file says is rebuilt from the run folder: the weights and the trained rank
and alpha from pytorch_lora_weights.safetensors, the settings from config.json, the captions from
dataset/, and how far training went from lora_info.json. So exporting a run again, any time later,
gives the file training wrote.

Metadata follows kohya's sd-scripts (train_network.py: `ss_*`, values as strings, as kohya writes
them) and Stability's ModelSpec 1.0.1 (`modelspec.*`). A1111 reads ss_output_name (the name it lists),
ss_base_model_version and ss_v2 (which model family it offers the LoRA for), ss_tag_frequency (the
tags it suggests), ss_sd_model_name, ss_resolution, ss_num_train_images, ss_dataset_dirs and
ss_training_started_at; civitai reads the same keys when a file is uploaded.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_gui import data
from lora_gui.config import TrainConfig
from lora_gui.errors import LoraFileError
from lora_gui.families import Family, get_family
from lora_gui.files import atomic_path, write_text_atomic
from lora_gui.kohya import save_kohya_lora, to_kohya
from lora_gui.lora_files import read_diffusers_lora
from lora_gui.runs import DIFFUSERS_LORA, LORA_LAYOUTS, RunFolder

log = logging.getLogger(__name__)

MODELSPEC_VERSION = "1.0.1"
# How kohya names the optimizer class in ss_optimizer.
OPTIMIZER_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit"}


@dataclass(frozen=True)
class TrainingRecord:
    """What the loop knows when it saves a LoRA and the rest of the run folder does not hold."""

    family: str
    prediction_type: str  # the noise scheduler's: "epsilon" or "v_prediction"
    base_model_name: str  # kohya's ss_sd_model_name: a local model's file or folder name, else the Hub id
    base_model_hub_id: str | None  # the Hub id the model card links to; None for a local model
    steps: int
    total_steps: int
    epoch: float  # passes over the images so far
    seconds: float  # time spent training, across stops and resumes
    preview_prompts: list[str]  # samples/step-N-K.png shows prompt K
    finished_at: float  # unix time of the save

    @classmethod
    def now(
        cls,
        family: type[Family],
        prediction_type: str,
        base_model: str,
        steps: int,
        total_steps: int,
        epoch: float,
        seconds: float,
        preview_prompts: list[str],
    ) -> TrainingRecord:
        # Whether the base model is a local path is known only now: it may be moved later.
        local = Path(base_model).expanduser()
        name, hub_id = (local.resolve().name, None) if local.exists() else (base_model, base_model)
        return cls(
            family.name, prediction_type, name, hub_id, steps, total_steps, epoch, seconds, preview_prompts, time.time()
        )

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run: RunFolder) -> TrainingRecord:
        try:
            return cls(**json.loads(run.lora_info.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise LoraFileError(
                f"{run.path} has no {run.lora_info.name}, which the LoRA's metadata is built from: it was saved "
                "by an older version of this app, or training has not saved a LoRA yet"
            ) from None
        except (json.JSONDecodeError, TypeError) as error:
            raise LoraFileError(f"{run.lora_info} is damaged ({error}); train the run again to rebuild it") from None


def write_kohya_lora(run: RunFolder, target: Path | None = None) -> Path:
    """Write the run's LoRA in kohya's layout (A1111, Forge, ComfyUI) with its metadata."""
    state, configs = read_diffusers_lora(run.diffusers_lora)
    record = TrainingRecord.load(run)
    tensors = to_kohya(state, configs, get_family(record.family))
    target = save_kohya_lora(target or run.kohya_lora, tensors, lora_metadata(run, record, configs))
    log.info("kohya LoRA saved to %s", target)
    return target


def lora_metadata(run: RunFolder, record: TrainingRecord, adapter_configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """kohya's `ss_*` and ModelSpec's `modelspec.*` metadata of a run's LoRA (without the hashes)."""
    config = TrainConfig.load(run.config)
    family = get_family(record.family)
    if not run.dataset.is_dir():
        raise LoraFileError(f"{run.dataset} is gone; the LoRA's metadata (image count, tags) is built from it")
    folders, captions = trained_captions(run, config.trigger_word)
    unet = adapter_configs["unet"]
    rank, alpha = unet["r"], float(unet["lora_alpha"])
    trigger = config.trigger_word.strip()
    epoch_number = max(1, math.ceil(round(record.epoch, 6)))
    planned_epochs = max(1, math.ceil(round(record.epoch * record.total_steps / record.steps, 6)))
    description = (
        f"LoRA for {family.title}, trained with lora_gui on {len(captions)} images for {record.steps} steps "
        f"(rank {rank}, alpha {alpha:g})." + (f" Trigger word: {trigger}." if trigger else "")
    )
    resolution = config.resolution
    metadata = {
        "ss_output_name": run.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_v2": str(family.kohya_base_model_version.startswith("sd_v2")),
        "ss_sd_model_name": record.base_model_name,
        "ss_resolution": str((resolution, resolution)),
        "ss_steps": str(record.steps),
        "ss_epoch": str(epoch_number),
        "ss_num_epochs": str(planned_epochs),
        "ss_max_train_steps": str(record.total_steps),
        "ss_num_train_images": str(len(captions)),
        "ss_num_reg_images": "0",
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": (
            f"{OPTIMIZER_CLASSES[config.optimizer]}(weight_decay={config.adam_weight_decay},"
            f"betas={(config.adam_beta1, config.adam_beta2)},eps={config.adam_epsilon})"
        ),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": str(config.seed),
        "ss_noise_offset": str(config.noise_offset),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_flip_aug": str(config.random_flip),
        "ss_enable_bucket": str(config.aspect_buckets),
        "ss_cache_latents": "True",
        "ss_training_started_at": str(record.finished_at - record.seconds),
        "ss_training_finished_at": str(record.finished_at),
        "ss_training_comment": "Trained with lora_gui" + (f"; trigger word: {trigger}" if trigger else ""),
        "ss_tag_frequency": json.dumps(tag_frequency(folders, captions)),
        "ss_dataset_dirs": json.dumps(
            {folder: {"n_repeats": 1, "img_count": count} for folder, count in Counter(folders).items()}
        ),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture_of(record.prediction_type),
        "modelspec.implementation": "diffusers",
        "modelspec.title": run.name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.fromtimestamp(record.finished_at, timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if record.prediction_type == "v_prediction" else "epsilon",
        "modelspec.description": description,
    }
    if config.train_text_encoder:
        metadata["ss_text_encoder_lr"] = str(config.text_encoder_learning_rate or config.learning_rate)
    if trigger:
        metadata["modelspec.trigger_phrase"] = trigger
        metadata["modelspec.usage_hint"] = f"Trigger word: {trigger}"
    return metadata


def tag_frequency(folders: list[str], captions: list[str]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per image folder, how many captions hold each comma-separated tag (lowercased)."""
    frequency: dict[str, dict[str, int]] = {}
    for folder, caption in zip(folders, captions, strict=True):
        counts = frequency.setdefault(folder, {})
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return frequency


def trained_captions(run: RunFolder, trigger_word: str) -> tuple[list[str], list[str]]:
    """The folder of each training image (as kohya names dataset folders) and its caption as trained.

    Read from the caption file the run's dataset/ copy holds beside every image; decoding the
    images again, as checking them does, would make saving a LoRA slow on a big dataset.
    """
    folders, captions = [], []
    for path in sorted(run.dataset.rglob("*.txt")):
        parent = path.parent.relative_to(run.dataset).as_posix()
        folders.append(run.dataset.name if parent == "." else parent)
        captions.append(data.full_caption(data.read_caption_file(path), trigger_word))
    return folders, captions


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
