"""Shared fixtures: tiny models are built once per test session; image sets per test."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lora_gui.config import TrainConfig
from lora_gui.demo import PINK, write_demo_dataset
from lora_gui.tiny import write_tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"  # screenshots and the app's log, for a person to look at


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


def pink_share(picture: np.ndarray) -> float:
    """The share of a picture's pixels (uint8 RGB) near the pink of the demo's concept, which the demo model alone
    never draws."""
    distance = np.linalg.norm(picture[..., :3].astype(float) - np.array(PINK), axis=-1)
    return float((distance < 90).mean())


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


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be sent, sends nothing."""

    calls: ClassVar[list] = []
    fail: ClassVar[Exception | None] = None

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False):
        if FakeHub.fail:
            raise FakeHub.fail
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
        from huggingface_hub.utils import filter_repo_objects

        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        FakeHub.calls.append(("upload", repo_id, sorted(filter_repo_objects(files, allow_patterns=allow_patterns))))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return FakeHub


@dataclass
class AppServer:
    url: str
    runs_dir: Path
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(runs_dir: Path, log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python app.py` as a user starts it, on a free port with `runs_dir` and `env` added to the environment (a
    Space's variables), its output added to `log`; the process and its address, once it answers."""
    port = free_port()
    base = {name: value for name, value in os.environ.items() if name != "SPACE_ID" and not name.startswith("LORA_GUI")}
    env = {**base, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT), **(env or {})}
    with log.open("a") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs_dir)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return process, url
        except OSError:
            assert process.poll() is None, f"the app exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the app did not start:\n{log.read_text()}"
            time.sleep(0.5)


@contextlib.contextmanager
def running_app(runs_dir: Path, log_name: str, env: dict[str, str] | None = None) -> Iterator[AppServer]:
    """`python app.py` as a user starts it (with `env`: as a Space starts it), its output in test-artifacts/; on
    leaving, stopped as Spaces stop it, and checked to have logged no error."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / log_name
    log.write_text("")
    process, url = start_app(runs_dir, log, env)
    yield AppServer(url, runs_dir, log)
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
    assert "Traceback" not in log.read_text(), f"the app logged an error:\n{log.read_text()}"


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """`python app.py` as a user starts it, on a free port with a temporary runs folder."""
    with running_app(tmp_path_factory.mktemp("app-runs"), "app-server.log") as server:
        yield server


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


def in_download_cache(cache: Path, repo: str, folder: Path) -> None:
    """A diffusers model folder put in a Hugging Face download cache as `repo`, laid out as huggingface_hub does."""
    revision, stored = "0" * 40, cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, stored / "snapshots" / revision)
    (stored / "refs").mkdir()
    (stored / "refs" / "main").write_text(revision)


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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every module the tests import is loaded now, and stays: leave those objects out of later garbage collections,
    as the app does once it has started (each run's end collects, and would otherwise walk all of them)."""
    gc.freeze()
