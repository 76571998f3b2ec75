"""Shared fixtures and hooks (what tests share besides fixtures is in tests/helpers/): tiny models are built once per
test session; image sets per test."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers.app import AppServer, running_app
from helpers.hub import FakeHub, push_here

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


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    """Pushes go to a FakeHub, which records them and sends nothing."""
    return push_here(monkeypatch, FakeHub())


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """`python app.py` as a user starts it, on a free port with a temporary runs folder."""
    with running_app(tmp_path_factory.mktemp("app-runs"), "app-server.log") as server:
        yield server


@pytest.fixture
def download_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


@pytest.fixture
def card(monkeypatch) -> Callable[..., object]:
    """Put a GPU of `memory_gb`, computing bf16 or only fp16, under the engine, on the CPU's kernels: every choice a
    card makes (precision, quantization, offloading, who has the GPU) is made as on that card, and runs here.

    `posing_as` (a family) makes a tiny model of that family weigh what the family's published one weighs, for the
    choices that read a model's size (Generate's quantization and offloading): each part's bytes per parameter as
    loaded here, times the published part's parameters."""
    import torch

    from lora_gui import devices, infer, quantization
    from lora_gui.estimate import denoiser_parameters
    from lora_gui.families import get_family

    def install(memory_gb: float, bf16: bool = True, posing_as: str | None = None) -> devices.Card:
        gpu = devices.Card(memory_gb, bf16, torch.device("cpu"))
        monkeypatch.setattr(devices, "card", lambda: gpu)
        if posing_as is not None:
            family = get_family(posing_as)
            published = {
                family.denoiser_name: denoiser_parameters(posing_as),
                **dict.fromkeys(family.text_encoder_names, family.text_encoder_params / len(family.text_encoder_names)),
                "vae": family.vae_params,
            }

            def full_size_bytes(pipe) -> float:
                parts = {name: getattr(pipe, name) for name in published}
                return sum(
                    quantization.stored_bytes(part) / sum(p.numel() for p in part.parameters()) * published[name]
                    for name, part in parts.items()
                )

            monkeypatch.setattr(
                infer, "denoiser_parameters_on_disk", lambda *args, **kwargs: published[family.denoiser_name]
            )
            monkeypatch.setattr(infer, "_weight_bytes", full_size_bytes)
        return gpu

    return install


TIERS = ("unit", "train", "app", "browser")  # registered in pyproject.toml; `unit` is scripts/test.sh --quick


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test carries exactly one tier (`pytestmark = pytest.mark.unit` in its module, or a mark on the test where
    a module mixes them), so that a new test can't dodge `-m unit` or slow the quick tier down unnoticed."""
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {' and '.join(tiers) if tiers else 'no tier'}")
    if wrong:
        listed = "\n  ".join(wrong)
        raise pytest.UsageError(f"each test needs exactly one tier mark of {', '.join(TIERS)}:\n  {listed}")
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))


# Tests that start processes of their own (the app, Chromium, the CLI, accelerate launch) keep to one worker under
# `pytest -n 2 --dist loadgroup` (scripts/test.sh), one after another: each of those processes computes on cores of
# its own, and two at once would leave the other worker none. (The timed ones, marked `alone`, run after the rest.)
OWN_PROCESSES = ("tests/test_cli.py", "tests/test_gpu_regime.py::test_two_processes")


def xdist_group(item: pytest.Item) -> str:
    """The worker group of a test: the tests that start processes together, every other module on its own (so that
    its module-scoped fixtures are built once)."""
    tier = next(mark.name for mark in item.iter_markers() if mark.name in TIERS)
    if tier in ("app", "browser") or item.nodeid.startswith(OWN_PROCESSES):
        return "processes"
    return item.nodeid.split("::")[0]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker computes on its share of the cores: two workers with torch's default of a
    thread per core ask twice the machine, and its threads, waiting on each other, made the suite's training tests
    up to five times slower than alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every module the tests import is loaded now, and stays: leave those objects out of later garbage collections,
    as the app does once it has started (each run's end collects, and would otherwise walk all of them)."""
    gc.freeze()
