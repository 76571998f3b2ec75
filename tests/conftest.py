"""Shared fixtures: tiny models are built once per test session; image sets per test."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lora_gui.config import TrainConfig
from lora_gui.demo import write_demo_dataset
from lora_gui.tiny import write_tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> a tiny diffusers model folder, written once per session on first use."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(family: str = "sd15") -> Path:
        if family not in built:
            built[family] = write_tiny_model(root / family, family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_models: Callable[[str], Path]) -> Path:
    return tiny_models("sd15")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_demo_dataset(tmp_path / "photos", count=6, size=(96, 96))


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
