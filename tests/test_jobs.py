"""The background runner: one run at a time, the rest queued; Stop keeps a usable LoRA; a run's state
belongs to the server, readable by anyone after the tab that started it is gone."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from diffusers import StableDiffusionPipeline
from helpers.runs import quick_config

from lora_gui import jobs as jobs_module
from lora_gui import run_dataset
from lora_gui.demo import write_demo_dataset
from lora_gui.errors import LoraGuiError
from lora_gui.jobs import JobManager
from lora_gui.runs import list_runs, summarize
from lora_gui.staging import Staging

pytestmark = pytest.mark.train


@pytest.fixture
def manager():
    manager = JobManager()
    yield manager
    manager.close()


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_run_is_queued_and_never_trains_alongside_the_first(
    tiny_model, photos, tmp_path, manager, monkeypatch
):
    running, most = 0, 0
    lock = threading.Lock()
    real_train = jobs_module.train

    def counting_train(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real_train(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(jobs_module, "train", counting_train)
    first = manager.submit(quick_config(tiny_model, photos, max_steps=10), tmp_path / "first")
    second = manager.submit(quick_config(tiny_model, photos, max_steps=4), tmp_path / "second")

    assert second.snapshot().status == "queued"
    # Once the worker has taken the first run (on a busy machine that can take a moment), one run is ahead.
    wait_for(lambda: first.snapshot().status == "running")
    assert manager.queue_position(second.job_id) == 1
    assert summarize(tmp_path / "second").status == "interrupted"  # queued on disk, read as not live
    assert manager.live_status(tmp_path / "second") == "queued"
    done = manager.wait(second.job_id, timeout=300)
    first_state = first.snapshot()
    assert (first_state.status, done.status) == ("finished", "finished")
    assert most == 1
    assert first_state.ended_at <= done.started_at
    assert [s.name for s in list_runs(tmp_path)] == ["second", "first"]


def test_stop_keeps_a_usable_lora_and_resume_finishes_the_run(tiny_model, photos, tmp_path, manager):
    run_dir = tmp_path / "run"
    job = manager.submit(quick_config(tiny_model, photos, max_steps=200), run_dir)
    wait_for(lambda: job.snapshot().step >= 2)
    manager.stop(job.job_id)
    stopped = manager.wait(job.job_id, timeout=120)

    assert stopped.status == "stopped"
    assert 2 <= stopped.step < 200
    # Both layouts: diffusers', and kohya's (named after the run) for AUTOMATIC1111 / Forge / ComfyUI.
    assert [f.split("/")[-1] for f in stopped.files] == ["pytorch_lora_weights.safetensors", "run.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(run_dir)  # a LoRA the libraries load as it is
    summary = summarize(run_dir)
    assert (summary.status, summary.resumable, summary.steps_done) == ("stopped", True, stopped.step)

    resumed = manager.resume(run_dir)
    manager.stop(resumed.job_id)  # then think better of it: resume again and let it finish
    manager.wait(resumed.job_id, timeout=120)
    config = summarize(run_dir)
    final = manager.submit(quick_config(tiny_model, photos, max_steps=config.steps_done + 2), run_dir, resume=True)
    assert manager.wait(final.job_id, timeout=120).status == "finished"
    assert summarize(run_dir).status == "finished"
    assert "resuming from step" in "\n".join(final.snapshot().log)


def test_the_state_outlives_the_tab_that_started_it(tiny_model, photos, tmp_path, manager):
    def tab() -> None:  # a browser tab's request: it submits, then it is gone
        manager.submit(quick_config(tiny_model, photos, max_steps=6, sample_every=3), tmp_path / "run")

    opener = threading.Thread(target=tab)
    opener.start()
    opener.join()

    job = manager.latest()  # what a page opened later shows
    assert job is not None and job.run.name == "run"
    state = manager.wait(job.job_id, timeout=120)
    assert state.status == "finished"
    assert [step for step, _ in state.losses] == [1, 2, 3, 4, 5, 6]
    assert len(state.samples) == 2 and all(caption.startswith("step ") for _, caption in state.samples)
    assert state.images_per_second and state.images_per_second > 0
    assert any("Training a sd15 LoRA on 6 images for 6 steps" in line for line in state.log)
    assert summarize(tmp_path / "run").status == "finished"


def test_a_failed_run_says_why_and_the_next_run_still_trains(tiny_model, photos, tmp_path, manager):
    bad = manager.submit(quick_config(tmp_path / "no-such-model", photos), tmp_path / "bad")
    good = manager.submit(quick_config(tiny_model, photos, max_steps=2), tmp_path / "good")
    failed = manager.wait(bad.job_id, timeout=120)
    assert failed.status == "failed"
    assert "not found" in failed.error
    assert manager.wait(good.job_id, timeout=120).status == "finished"
    summary = summarize(tmp_path / "bad")
    assert (summary.status, summary.resumable) == ("failed", False)
    assert "not found" in summary.message
    with pytest.raises(Exception, match="no saved checkpoint"):
        manager.resume(tmp_path / "bad")


def test_a_run_on_the_staged_pictures_gets_its_dataset_written_once_at_start(
    tiny_model, tmp_path, manager, monkeypatch
):
    staging = Staging.for_session(tmp_path / "runs")
    staging.import_folder(write_demo_dataset(tmp_path / "photos", count=4, size=(64, 64)))
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    staging.add_files([broken])
    staging.items()  # the thumbnails, which stay behind
    written = []
    real_copy = run_dataset.copy_into_run
    monkeypatch.setattr(
        run_dataset, "copy_into_run", lambda *args, **kwargs: written.append(args[1]) or real_copy(*args, **kwargs)
    )

    run_dir = tmp_path / "runs" / "from-the-app"
    job = manager.submit_new(quick_config(tiny_model, "", max_steps=2), run_dir, staging.folder)
    # The visitor goes on editing while the run waits and trains: the run keeps the pictures as they were.
    staging.set_caption("demo_00.png", "changed after Start")
    staging.remove("demo_01.png")
    state = manager.wait(job.job_id, timeout=120)

    assert state.status == "finished"
    dataset = run_dir.resolve() / "dataset"
    assert written == [dataset], "written once, at Start; the run did not copy it onto itself"
    assert sorted(p.name for p in dataset.iterdir()) == [f"demo_0{i}.{ext}" for i in range(4) for ext in ("png", "txt")]
    assert (dataset / "demo_00.txt").read_text() == "a photo of a red circle\n"
    assert os.stat(dataset / "demo_02.png").st_ino == os.stat(staging.folder / "demo_02.png").st_ino  # a hard link
    assert not (run_dir / "uploads").exists()
    assert json.loads((run_dir / "config.json").read_text())["data"] == str(dataset)
    assert any("Skipped broken.png: not an image file" in line for line in state.log)
    assert any("Training a sd15 LoRA on 4 images" in line for line in state.log)

    with pytest.raises(LoraGuiError, match="a run named from-the-app already exists: pick another name"):
        manager.submit_new(quick_config(tiny_model, ""), run_dir, staging.folder)


def test_closing_records_what_did_not_end_in_time_and_refuses_new_runs(tiny_model, photos, tmp_path, monkeypatch):
    release = threading.Event()

    def deaf_train(config, run_dir, **kwargs):  # a run that does not hear Stop (a long download, say)
        release.wait(30)

    monkeypatch.setattr(jobs_module, "train", deaf_train)
    manager = JobManager()
    training = manager.submit(quick_config(tiny_model, photos), tmp_path / "training")
    queued = manager.submit(quick_config(tiny_model, photos), tmp_path / "queued")
    wait_for(lambda: training.snapshot().status == "running")

    manager.close(timeout=0.2)
    release.set()

    assert training.snapshot().status == "interrupted"
    assert summarize(tmp_path / "training").message == (
        "Interrupted when the app stopped at step 0. It saved no checkpoint: start it again as a new run."
    )
    assert queued.snapshot().status == "cancelled"
    assert json.loads((tmp_path / "queued" / "status.json").read_text())["status"] == "cancelled"
    with pytest.raises(LoraGuiError, match="the app is shutting down"):
        manager.submit(quick_config(tiny_model, photos), tmp_path / "late")
