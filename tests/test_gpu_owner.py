"""One user of the GPU at a time (lora_gui/gpu_owner.py): a training run, captioning and the Generate tab, driven as
the app drives them, on a simulated GPU whose device is the CPU so that everything still runs here.

Without a GPU none of this applies: the tiny demo trains, captions and generates side by side on the CPU
(tests/test_gpu_regime.py, test_a_starting_run_unloads_the_generate_model_and_says_so, and the app's tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.app import generate_request
from helpers.runs import quick_config

from lora_gui import devices
from lora_gui.captioning import folder as captioning_folder
from lora_gui.captioning.folder import CaptionPass
from lora_gui.captioning.wd_tagger import WdTagger
from lora_gui.demo import write_demo_dataset
from lora_gui.jobs import JobManager, JobState
from lora_gui.owners import EVERYONE
from lora_gui.ui.captioning import TINY_CAPTIONER
from lora_gui.ui.common import Ctx

pytestmark = pytest.mark.train

GPU = devices.Card(memory_gb=24, bf16=True, device=torch.device("cpu"))
CAPTIONING_BLOCKS_A_RUN = "Captioning is using the GPU"
RUN_HAS_THE_GPU = "A run is training on the GPU, so captioning runs on the processor (slower)."


@pytest.fixture
def app(tmp_path, monkeypatch) -> Iterator[Ctx]:
    from lora_gui.ui.app import build_app

    monkeypatch.setattr(devices, "card", lambda: GPU)
    jobs = JobManager()
    _, ctx = build_app(tmp_path / "runs", jobs)
    yield ctx
    jobs.close(timeout=60)


@pytest.fixture
def held_captioning(monkeypatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Captioning that, once it has its first pictures, holds them until the test lets it go: (let go, holding)."""
    let_go, holding = threading.Event(), threading.Event()
    caption = WdTagger.caption

    def waits(self, images):
        holding.set()
        if not let_go.wait(60):
            raise TimeoutError("the test never let captioning finish")
        return caption(self, images)

    monkeypatch.setattr(WdTagger, "caption", waits)
    yield let_go, holding
    let_go.set()  # a failed test never leaves the captioning thread waiting


def uncaptioned(folder: Path) -> Path:
    folder = write_demo_dataset(folder, count=2, size=(64, 64))
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


def captioning(app: Ctx, folder: Path) -> Iterator[object]:
    """A captioning pass of the tiny tagger over `folder`, as the Dataset tab starts it."""
    return app.captioning.in_background(
        TINY_CAPTIONER, folder, EVERYONE, overwrite=False, prefix="", should_stop=lambda: False
    )


def log_line(job, words: str, timeout: float = 30) -> str:
    """The first line of the job's log holding `words`, waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in job.snapshot().log if words in line]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {words!r} in the run's log: {job.snapshot().log}")


def index_of(state: JobState, words: str) -> int:
    return next(index for index, line in enumerate(state.log) if words in line)


def test_a_run_waits_for_captioning_on_the_gpu_and_says_why(app, held_captioning, tiny_model, photos, tmp_path):
    let_go, holding = held_captioning
    told = captioning(app, uncaptioned(tmp_path / "pictures"))
    next(told)  # where it captions: by now it has the GPU
    assert holding.wait(30)

    job = app.engine.jobs.submit(quick_config(tiny_model, photos, max_steps=1, mixed_precision="no"), tmp_path / "run")
    assert "this run starts once that pass ends" in log_line(job, CAPTIONING_BLOCKS_A_RUN)
    time.sleep(0.5)
    assert not any("Checking images" in line for line in job.snapshot().log), "it loaded nothing beside captioning"
    # A pass started now leaves the GPU to the waiting run, so a stream of passes can't keep it waiting.
    later = captioning(app, uncaptioned(tmp_path / "more pictures"))
    assert next(later) == RUN_HAS_THE_GPU

    let_go.set()
    assert isinstance([*told][-1], CaptionPass)
    state = app.engine.jobs.wait(job.job_id, timeout=300)
    assert state.status == "finished", state.error
    assert index_of(state, CAPTIONING_BLOCKS_A_RUN) < index_of(state, "Checking images")
    assert [*later][-1].captioned, "the later pass captioned on the processor"


def test_a_run_stopped_while_it_waits_for_captioning_is_cancelled(app, held_captioning, tiny_model, photos, tmp_path):
    let_go, holding = held_captioning
    told = captioning(app, uncaptioned(tmp_path / "pictures"))
    next(told)
    assert holding.wait(30)
    job = app.engine.jobs.submit(quick_config(tiny_model, photos, max_steps=1, mixed_precision="no"), tmp_path / "run")
    log_line(job, CAPTIONING_BLOCKS_A_RUN)
    app.engine.jobs.stop(job.job_id)
    state = app.engine.jobs.wait(job.job_id, timeout=30)
    assert state.status == "cancelled"
    assert not any("Checking images" in line for line in state.log)
    let_go.set()
    assert isinstance([*told][-1], CaptionPass)


def test_generate_is_refused_while_captioning_has_the_gpu(app, held_captioning, tiny_model, tmp_path):
    from lora_gui.ui.generate import generate

    let_go, holding = held_captioning
    told = captioning(app, uncaptioned(tmp_path / "pictures"))
    next(told)
    assert holding.wait(30)
    refused = generate(app, EVERYONE, **generate_request(tiny_model, tiny_model / "never-read.safetensors"))
    assert "Pictures are being captioned on the GPU" in refused["gen_notice"]
    assert app.engine.generators.model is None, "nothing was loaded beside captioning"
    let_go.set()
    assert isinstance([*told][-1], CaptionPass)


def test_captioning_during_a_run_runs_on_the_processor_and_says_so(app, tiny_model, photos, tmp_path, monkeypatch):
    loaded_on = []
    load = captioning_folder.load_captioner

    def recorded(name, **kwargs):
        loaded_on.append(kwargs.get("device", "cpu"))
        return load(name, **kwargs)

    monkeypatch.setattr(captioning_folder, "load_captioner", recorded)
    job = app.engine.jobs.submit(
        quick_config(tiny_model, photos, max_steps=2000, mixed_precision="no"), tmp_path / "run"
    )
    log_line(job, "Training a ")
    try:
        told = [*captioning(app, uncaptioned(tmp_path / "pictures"))]
    finally:
        app.engine.jobs.stop(job.job_id)
    assert told[0] == RUN_HAS_THE_GPU
    assert loaded_on == ["cpu"]
    assert told[-1].captioned
    assert app.engine.jobs.wait(job.job_id, timeout=120).status == "stopped"
