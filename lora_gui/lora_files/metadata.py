"""What a run's kohya file says about how it was trained, rebuilt from the run folder.

The settings come from config.json, the captions from dataset/, and how far training went from
lora_info.json (runs.TrainingRecord). Metadata follows kohya's sd-scripts (train_network.py: `ss_*`,
values as strings, as kohya writes them) and Stability's ModelSpec 1.0.1 (`modelspec.*`). A1111 reads
ss_output_name (the name it lists), ss_base_model_version and ss_v2 (which model family it offers the
LoRA for), ss_tag_frequency (the tags it suggests), ss_sd_model_name, ss_resolution,
ss_num_train_images, ss_dataset_dirs and ss_training_started_at; civitai reads the same keys when a
file is uploaded. A DoRA, LoHa or LoKr says so as LyCORIS' kohya network does (lycoris/kohya.py): the module
`lycoris.kohya` and its arguments in ss_network_args (algo, dora_wd, wd_on_output, factor), values as strings.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_gui import data
from lora_gui.adapter_kinds import ADAPTER_KINDS
from lora_gui.config import TrainConfig
from lora_gui.errors import LoraFileError
from lora_gui.families import get_family
from lora_gui.optimizers import OPTIMIZERS
from lora_gui.runs import RunFolder, TrainingRecord

MODELSPEC_VERSION = "1.0.1"
MODELSPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


def lora_metadata(run: RunFolder, record: TrainingRecord, adapter_configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """kohya's `ss_*` and ModelSpec's `modelspec.*` metadata of a run's LoRA (without the hashes)."""
    config = TrainConfig.load(run.config)
    family = get_family(record.family)
    if not run.dataset.is_dir():
        raise LoraFileError(f"{run.dataset} is gone; the LoRA's metadata (image count, tags) is built from it")
    folders, captions = trained_captions(run, config.trigger_word)
    # As kohya writes them: its optimizer's arguments, key=value.
    optimizer = OPTIMIZERS[config.optimizer]
    optimizer_args = ",".join(f"{name}={value}" for name, value in optimizer.settings(config).items())
    denoiser = adapter_configs[family.denoiser_name]
    rank, alpha = denoiser["r"], float(denoiser["lora_alpha"] if "lora_alpha" in denoiser else denoiser["alpha"])
    trigger = config.trigger_word.strip()
    kind = ADAPTER_KINDS[config.lora_type]
    description = (
        f"{kind.long_title} for {family.title}, trained with lora_gui on {len(captions)} images "
        f"for {record.steps} steps (rank {rank}, alpha {alpha:g})." + (f" Trigger word: {trigger}." if trigger else "")
    )
    resolution = config.resolution
    metadata = {
        "ss_output_name": run.name,
        "ss_network_module": "lycoris.kohya" if kind.lycoris_args else family.kohya_network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_v2": str(family.kohya_base_model_version.startswith("sd_v2")),
        "ss_sd_model_name": record.base_model_name,
        "ss_resolution": str((resolution, resolution)),
        **_length(record),
        "ss_num_train_images": str(len(captions)),
        "ss_num_reg_images": "0",
        **_steps(config),
        "ss_optimizer": f"{optimizer.kohya_class}({optimizer_args})",
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
        **_modelspec(run.name, record, resolution, description),
    }
    if kind.lycoris_args:
        metadata["ss_network_args"] = json.dumps(kind.lycoris_args)
    if config.train_text_encoder:
        metadata["ss_text_encoder_lr"] = str(config.text_encoder_learning_rate or config.learning_rate)
    if trigger:
        metadata["modelspec.trigger_phrase"] = trigger
        metadata["modelspec.usage_hint"] = f"Trigger word: {trigger}"
    return metadata


def _length(record: TrainingRecord) -> dict[str, str]:
    """How far training went, in steps and epochs (the one under way counts whole), and how far it was to go."""
    return {
        "ss_steps": str(record.steps),
        "ss_epoch": str(max(1, math.ceil(round(record.epoch, 6)))),
        "ss_num_epochs": str(max(1, math.ceil(round(record.epoch * record.total_steps / record.steps, 6)))),
        "ss_max_train_steps": str(record.total_steps),
    }


def _steps(config: TrainConfig) -> dict[str, str]:
    """What each step took and how its learning rate went."""
    return {
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
    }


def _modelspec(title: str, record: TrainingRecord, resolution: int, description: str) -> dict[str, str]:
    """ModelSpec's keys, but the trigger word's."""
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": get_family(record.family).modelspec_architecture_of(
            record.prediction_type, record.variant
        ),
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.fromtimestamp(record.finished_at, timezone.utc).isoformat(timespec="seconds"),
        "modelspec.description": description,
    }
    if record.prediction_type in MODELSPEC_PREDICTION_TYPES:  # ModelSpec names no others (Flux's is flow)
        spec["modelspec.prediction_type"] = MODELSPEC_PREDICTION_TYPES[record.prediction_type]
    return spec


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
    held_out = {Path(name).with_suffix("").as_posix() for name in run.held_out()}
    for path in sorted(run.dataset.rglob("*.txt")):
        if path.relative_to(run.dataset).with_suffix("").as_posix() in held_out:
            continue  # a validation picture: never trained on
        parent = path.parent.relative_to(run.dataset).as_posix()
        folders.append(run.dataset.name if parent == "." else parent)
        captions.append(data.full_caption(data.read_caption_file(path), trigger_word))
    return folders, captions
