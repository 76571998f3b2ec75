"""Settings for a training run of seconds on a CPU: as a TrainConfig, and as `python -m lora_gui train`'s arguments."""

from __future__ import annotations

from pathlib import Path

from lora_gui.config import TrainConfig


def quick_config(base_model: Path, data: Path, **changes) -> TrainConfig:
    """Settings for a run of a few seconds on a CPU."""
    values = dict(
        base_model=str(base_model),
        data=str(data),
        resolution=64,
        max_steps=12,
        batch_size=2,
        learning_rate=1e-3,
        rank=4,
        sample_every=0,
        sample_steps=2,
        checkpoint_every=0,
        seed=7,
    )
    values.update(changes)
    return TrainConfig(**values)


def train_argv(base_model: Path | str, data: Path | str, output: Path | str, **flags: object) -> list[str]:
    """Arguments of `python -m lora_gui train`, flags as keywords: max_steps=3 -> --max-steps 3,
    aspect_buckets=False -> --no-aspect-buckets, a list -> several values."""
    argv = ["train", "--base-model", str(base_model), "--data", str(data), "--output", str(output)]
    for name, value in flags.items():
        flag = name.replace("_", "-")
        if value is True or value is False:
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{flag}", *map(str, value)]
        else:
            argv += [f"--{flag}", str(value)]
    return argv
