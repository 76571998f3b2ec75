"""The app asked to exit (SIGTERM from Docker or a Space, Ctrl+C) lets the run training stop after its step, with
a checkpoint and a usable LoRA; an app killed outright finds its run interrupted when it starts again, and
Resume continues it."""

from __future__ import annotations

import html
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from helpers.app import start_app
from safetensors import safe_open

from lora_gui.jobs import JobManager
from lora_gui.runs import RunFolder, summarize

pytestmark = pytest.mark.app

GRACE_SECONDS = 25  # what the app is given to stop, and what a Space allows it (30 s) less some margin
SLOW_RUN = dict(
    max_steps=2000, sample_every=0, resolution=64, sample_steps=2, learning_rate=0.001, rank=4, batch_size=1
)


@contextmanager
def app(runs_dir: Path, log: Path) -> Iterator[tuple[subprocess.Popen, Client]]:
    """`python app.py` on `runs_dir`, and a visitor's client; killed at the end if the test left it running."""
    process, url = start_app(runs_dir, log)
    try:
        yield process, Client(url, verbose=False)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition, what: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.2)


def start_run(client: Client, photos: Path, name: str, **settings) -> None:
    client.predict(upload=[handle_file(str(path)) for path in sorted(photos.iterdir())], api_name="/upload")
    started = html.unescape(str(client.predict(run_name=name, **SLOW_RUN, **settings, api_name="/start")))
    assert f"Training {name} started" in started


def steps_logged(run: RunFolder) -> int:
    rows = run.read_metrics()
    return rows[-1]["step"] if rows else 0


def lora_steps(run: RunFolder) -> int:
    with safe_open(str(run.kohya_lora), "pt") as lora:
        return int(lora.metadata()["ss_steps"])


def test_sigterm_stops_the_run_after_its_step_and_it_resumes_from_there(photos, tmp_path):
    runs_dir, log = tmp_path / "runs", tmp_path / "app.log"
    run = RunFolder(runs_dir / "stopped-by-sigterm")
    with app(runs_dir, log) as (process, client):
        start_run(client, photos, run.name, checkpoint_every=0)
        wait_for(lambda: steps_logged(run) >= 3, "three steps", log)
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(GRACE_SECONDS + 5)
        exit_seconds = time.monotonic() - asked
    print(f"exited {exit_seconds:.1f} s after SIGTERM")
    assert exit_seconds < GRACE_SECONDS
    assert process.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()

    status = json.loads(run.status_file.read_text())
    stopped_at = status["step"]
    assert status["status"] == "stopped" and stopped_at >= 3
    assert run.latest_checkpoint() == (stopped_at, run.checkpoint(stopped_at))
    assert run.diffusers_lora.is_file() and lora_steps(run) == stopped_at
    assert steps_logged(run) == stopped_at  # nothing trained after the step it stopped at

    jobs = JobManager()
    resumed = jobs.resume(run.path)
    wait_for(lambda: resumed.snapshot().losses, "a step of the resumed run", log)
    jobs.close()
    state = resumed.snapshot()
    assert state.status == "stopped"
    assert any(f"resuming from step {stopped_at}" in line for line in state.log)
    assert state.losses[0][0] == stopped_at + 1


def test_a_run_killed_with_the_app_is_interrupted_after_a_restart_and_resumes(photos, tmp_path):
    runs_dir, log = tmp_path / "runs", tmp_path / "app.log"
    run = RunFolder(runs_dir / "killed")
    with app(runs_dir, log) as (process, client):
        start_run(client, photos, run.name, checkpoint_every=2)
        wait_for(lambda: steps_logged(run) >= 3, "three steps", log)
        process.kill()
        process.wait()
    checkpoint = run.latest_checkpoint()[0]
    killed_at = steps_logged(run)
    assert json.loads(run.status_file.read_text())["status"] == "running"  # what a killed app leaves behind

    with app(runs_dir, log) as (process, client):
        status = json.loads(run.status_file.read_text())  # written down as the app started
        assert status["status"] == "interrupted"
        assert status["message"] == (
            f"Interrupted when the app stopped at step {killed_at}. "
            f"Resume continues from the last checkpoint (step {checkpoint})."
        )
        listing = html.unescape(str(client.predict(run_pick=None, api_name="/list_runs")))
        assert "interrupted" in listing
        opened = html.unescape(str(client.predict(run_pick=run.name, api_name="/open_run")))
        assert f"Resume continues from the last checkpoint (step {checkpoint})" in opened

        resumed = html.unescape(str(client.predict(run_pick=run.name, api_name="/resume")))
        assert f"{run.name} is resuming" in resumed
        wait_for(lambda: summarize(run.path).steps_done > killed_at, "the resumed run to train", log)
        assert f"Resumed from {run.checkpoint(checkpoint)}" in run.log.read_text()
        process.send_signal(signal.SIGTERM)
        process.wait(GRACE_SECONDS + 5)
    assert json.loads(run.status_file.read_text())["status"] == "stopped"
    assert "Traceback" not in log.read_text(), log.read_text()
