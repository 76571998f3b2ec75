"""What a training run reports while it works. The loop emits these; jobs, the UI, the CLI and the
tests consume them. Plain data, so any of them can store, print or draw an event."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# data: run_dir, images (trained on), validation (its pictures, or why none), validation_pictures, skipped, device,
# precision, resumed_from
STARTED = "started"
STEP = "step"  # data: loss, lr, grad_norm, images_per_second, eta_seconds, epoch; val_loss, best_step where measured
SAMPLES = "samples"  # data: paths, prompts
CHECKPOINT = "checkpoint"  # data: path
# data: lora (the diffusers file), files (the LoRA files, the model card), message (the best step, an early stop)
FINISHED = "finished"
STOPPED = "stopped"  # data: lora, checkpoint (both may be None if stopped before the first step)
FAILED = "failed"  # data: message, log
MESSAGE = "message"  # data: text (progress notes such as "caching latents")
DOWNLOAD = "download"  # data: repo, done_bytes, total_bytes, files_done, files_total (the base model downloading)

ENDINGS = (FINISHED, STOPPED, FAILED)


@dataclass
class Event:
    kind: str
    step: int = 0
    total_steps: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


EventHandler = Callable[[Event], None]
