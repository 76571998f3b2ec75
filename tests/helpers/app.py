"""The app as its users meet it: `python app.py` started as a person (or a Space) starts it, on a free port, and what
its endpoints answer, read as the page shows it."""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gradio_client import Client, handle_file

from .paths import ARTIFACTS, ROOT

# Settings for a run of seconds, as the Train tab's fields.
# `python app.py` as a Space starts it (SPACE_ID set), with small quotas: the Space tests' server.
SPACE = {
    "SPACE_ID": "someone/lora-trainer",
    "LORA_GUI_MAX_STAGING_MB": "20",
    "LORA_GUI_MAX_FILE_MB": "8",
    "LORA_GUI_MAX_RUNS_PER_VISITOR": "1",
    "LORA_GUI_MIN_FREE_GB": "0",
}

ENGINE_READY = "training and Generate are ready"  # what the app prints once its engine has loaded
# What a library prints that a person can't act on (our own WARNING lines are sentences about their files).
LIBRARY_NOISE = re.compile(r"torchao|torchvision|_pytree|deprecat|FutureWarning|UserWarning|share=True|launch\(\)")

QUICK = dict(resolution=64, sample_steps=2, checkpoint_every=0, learning_rate=0.001, rank=4, batch_size=2)


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
    Space's variables), its output added to `log`; the process and its address, once it answers. If it exits or does
    not answer within three minutes, it is stopped and this raises with its log."""
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
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"the app did not start; its log:\n{log.read_text()}") from None
            time.sleep(0.2)


def stop_app(process: subprocess.Popen) -> None:
    """Stop the app as Spaces stop it: it saves what is training and exits."""
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def worker_log_name(log_name: str) -> str:
    """`log_name`, told apart per pytest-xdist worker (app-server.gw1.log) when the suite runs on several."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return log_name
    stem, dot, suffix = log_name.rpartition(".")
    return f"{stem}.{worker}.{suffix}" if dot else f"{log_name}.{worker}"


@contextlib.contextmanager
def running_app(runs_dir: Path, log_name: str, env: dict[str, str] | None = None) -> Iterator[AppServer]:
    """`python app.py` as a user starts it (with `env`: as a Space starts it), its output in test-artifacts/; on
    leaving, stopped as Spaces stop it, and checked to have logged no error."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / worker_log_name(log_name)
    log.write_text("")
    process, url = start_app(runs_dir, log, env)
    try:
        # The tests act as a person who opens the page once the app has said it loaded: the Dataset tab answers at
        # once, but Start, Generate and captioning would wait seconds for the engine (test_first_start.py times it).
        deadline = time.monotonic() + 180
        while ENGINE_READY not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        yield AppServer(url, runs_dir, log)
    finally:
        stop_app(process)
    assert "Traceback" not in log.read_text(), f"the app logged an error:\n{log.read_text()}"
    noise = LIBRARY_NOISE.search(log.read_text())
    assert noise is None, f"the app printed a library's warning ({noise.group()}):\n{log.read_text()}"


def text(result) -> str:
    """Everything an endpoint returned, as one string to look for messages in (as the page shows them)."""
    return html.unescape(" ".join(str(value) for value in (result if isinstance(result, tuple) else (result,))))


def shown(output):
    """The value an output shows: handlers that also change a component's label or visibility send an update."""
    if isinstance(output, dict) and output.get("__type__") == "update":
        return output.get("value")
    return output


def upload_pictures(client: Client, folder: Path) -> str:
    files = [handle_file(str(path)) for path in sorted(folder.iterdir())]
    return text(client.predict(upload=files, api_name="/upload"))


def progress(client: Client) -> tuple:
    return client.predict(api_name="/progress")


def wait_until(client: Client, words: str, timeout: float = 300) -> list:
    """Poll the live view until it says `words`; return what the page shows then. A poll skips the parts
    that did not change since the last one, so each part is its latest value over all polls."""
    deadline = time.monotonic() + timeout
    page: list = []
    while True:
        result = progress(client)
        page = [old if new == {"__type__": "update"} else new for old, new in zip(page or result, result, strict=True)]
        if words in html.unescape(result[0]):
            return page
        assert time.monotonic() < deadline, f"never saw {words!r}; last: {result[0]}"
        time.sleep(0.2)


def generate_request(base_model: Path, lora: Path) -> dict:
    """What the Generate button sends: one quick picture with one LoRA file."""
    return dict(
        allow_pickle=False,
        gen_base_model=str(base_model),
        prompt="a red circle",
        negative_prompt="",
        gen_seed=0,
        gen_steps=1,
        guidance=7.0,
        size=64,
        gen_upload_1=str(lora),
        strength_1=1.0,
    )


def raw_event(
    space: AppServer, trigger: str, values: dict[str, object], session: str, must_succeed: bool = False
) -> list:
    """Call the page's event on `trigger` (a button's words, or "load": the load event that reads `values`' keys),
    private or not, as a raw queue call in `session`: every input at its starting value but `values`, by label or
    storage key. Returns the event's outputs (its error, in their place, unless it `must_succeed`)."""
    config = json.load(urllib.request.urlopen(f"{space.url}config", timeout=30))
    props = {component["id"]: component.get("props", {}) for component in config["components"]}

    def named(id_: int) -> object:
        return props[id_].get("label") or props[id_].get("storage_key")

    def triggered(dependency: dict) -> bool:
        if trigger == "load":
            return any(event == "load" for _, event in dependency["targets"]) and any(
                named(id_) in values for id_ in dependency["inputs"]
            )
        return any(props.get(id_, {}).get("value") == trigger for id_, _ in dependency["targets"])

    (dependency,) = [dependency for dependency in config["dependencies"] if triggered(dependency)]
    data = [values.get(named(id_), props[id_].get("value")) for id_ in dependency["inputs"]]
    body = {"data": data, "fn_index": dependency["id"], "session_hash": session, "event_data": None}
    request = urllib.request.Request(
        f"{space.url}gradio_api/queue/join", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=30).close()
    with urllib.request.urlopen(f"{space.url}gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                assert message["success"] or not must_succeed, message
                return message["output"].get("data") or [message["output"].get("error")]
    raise AssertionError("the event never completed")


def gradio_import_seconds() -> float:
    """How long importing Gradio takes in a new Python on this machine now: the timed tests' measure of how busy or
    slow the host is (3 s on the quiet 2-core machine the promises were measured on)."""
    import subprocess
    import sys

    code = "import time; started = time.monotonic(); import gradio; print(time.monotonic() - started)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
