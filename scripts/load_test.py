"""Many strangers on one Space at once: while one visitor's tiny run trains, N others (each a gradio_client of
their own, so a session of their own) upload pictures, edit captions and poll the live view twice a second.

    python scripts/load_test.py [--clients 20] [--seconds 60] [--baseline 15] [--url URL --runs-dir DIR]

Without --url it starts `python app.py` as a Space starts it (SPACE_ID set) on a temporary runs folder, and stops
it at the end. With --url it loads an app already running as a Space; the checks that read the app's files (the run's
metrics and status, the staged pictures) need that app's --runs-dir too, and are left out without it.

It checks what a visitor cares about: every poll answered (no error, no timeout); no step of the run lost (its
metrics.jsonl counts 1, 2, ... to the step it stopped at, and its status says stopped there); no visitor sees
another's run or files (nothing another visitor named appears in what the app answers them, and each visitor's
staging folder holds exactly the pictures they uploaded, with their own captions). Then it prints a table: the
poll latencies, the work done, the run's speed during the load against --baseline seconds of it alone.
`tests/test_load.py` runs it briefly and asserts the checks; the latencies are for a person to read.
"""

from __future__ import annotations

import argparse
import html
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package is used from the checkout, not installed
sys.path.insert(0, str(ROOT / "tests"))  # and the tests' helpers: the app started as the tests start it

import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from helpers.app import start_app, stop_app  # noqa: E402

from lora_gui.data import picture_files  # noqa: E402
from lora_gui.demo import COLORS, SHAPES, draw_shape  # noqa: E402
from lora_gui.owners import anonymous, read_owner  # noqa: E402
from lora_gui.runs import STOPPED, RunFolder  # noqa: E402
from lora_gui.staging import STAGING_DIR  # noqa: E402

SPACE = {
    "SPACE_ID": "load-test/lora-trainer",
    "LORA_GUI_MIN_FREE_GB": "0",  # a shared test machine's disk is not what is measured here
    "HF_HUB_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}
# Long enough to outlast any load, even on a GPU; previews every few steps, so the run writes pictures while
# visitors poll.
RUN = dict(
    max_steps=100_000,
    sample_every=10,
    checkpoint_every=50,
    resolution=64,
    sample_steps=2,
    learning_rate=0.001,
    rank=4,
    batch_size=1,
)
PICTURES_PER_CLIENT = 3
POLL_EVERY = 0.5  # seconds, as the page's timer polls
POLL_TIMEOUT = 30  # seconds: a poll slower than this counts as unanswered
EDIT_EVERY = 5  # seconds between a visitor's caption edits
STEP = re.compile(r"step (\d+) of")


@dataclass
class LoadResult:
    """What the load did and what went wrong; each list of problems is empty when that check held."""

    clients: int
    seconds: float  # how long the load ran, from the first visitor's connection to the last one's end
    latencies: list[float]  # seconds, of every poll answered
    unanswered: list[str]  # polls that failed or timed out, each with what happened
    upload_seconds: list[float]  # of every upload (3 pictures and their captions)
    edit_seconds: list[float]  # of every caption edit
    steps_during_load: int
    steps_per_second: float
    baseline_steps_per_second: float | None  # the run alone, before the load; None when not measured
    lost_steps: list[str]  # what is wrong with the run's metrics and status
    leaks: list[str]  # anything a visitor saw or holds of another's
    errors: list[str]  # anything else: an upload or edit refused, a visitor who never connected, the app's traceback
    checked_files: bool  # whether the run's files and the staging folders could be read (not with --url alone)

    @property
    def polls(self) -> int:
        return len(self.latencies) + len(self.unanswered)

    @property
    def uploads(self) -> int:
        return len(self.upload_seconds)

    @property
    def caption_edits(self) -> int:
        return len(self.edit_seconds)

    @property
    def failures(self) -> list[str]:
        return [*self.unanswered, *self.lost_steps, *self.leaks, *self.errors]

    def table(self) -> str:
        def latency(quantile: float) -> str:  # nearest rank
            ordered = sorted(self.latencies)
            return f"{1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]:.0f} ms" if ordered else "-"

        baseline = "-" if self.baseline_steps_per_second is None else f"{self.baseline_steps_per_second:.2f}"
        rows = [
            ("clients", self.clients),
            ("duration", f"{self.seconds:.0f} s"),
            ("polls", f"{self.polls} ({len(self.unanswered)} unanswered)"),
            ("poll latency p50", latency(0.5)),
            ("poll latency p95", latency(0.95)),
            ("poll latency max", latency(1.0)),
            ("uploads", f"{self.uploads} (slowest {max(self.upload_seconds, default=0):.1f} s)"),
            ("caption edits", f"{self.caption_edits} (slowest {max(self.edit_seconds, default=0):.1f} s)"),
            ("training steps during the load", self.steps_during_load),
            ("steps/s with the load", f"{self.steps_per_second:.2f}"),
            ("steps/s alone (baseline)", baseline),
            ("steps lost", "not checked" if not self.checked_files else len(self.lost_steps)),
            (
                "leaks between visitors",
                len(self.leaks) if self.checked_files else f"{len(self.leaks)} (files not checked)",
            ),
            ("failures", len(self.failures)),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'':{width}} | value |", f"| {'-' * width} | --- |"]
        lines += [f"| {name:{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


@dataclass
class Visitor:
    """One of the load's clients: what it sent, what it got back, and what it should find on the server."""

    index: int
    client: Client | None = None
    pictures: int = 0  # how many it uploaded that the app took
    upload_seconds: list[float] = field(default_factory=list)
    edit_seconds: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # of the polls answered
    unanswered: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the text of everything the app answered

    @property
    def polls(self) -> int:
        return len(self.latencies) + len(self.unanswered)

    @property
    def prefix(self) -> str:
        return f"guest{self.index:02d}-"  # its files' names; no other visitor should ever see it

    @property
    def trigger(self) -> str:
        return f"trig{self.index:02d}x"  # its trigger word; no other visitor's captions should ever hold it

    @property
    def owner(self) -> str:
        """The owner id the app gives an API client: one made from its session (Ctx.visitor)."""
        return anonymous(f"session:{self.client.session_hash}") if self.client else ""


def text(result) -> str:
    """Everything an endpoint returned, as one string (as the page would show it)."""
    return html.unescape(" ".join(str(value) for value in (result if isinstance(result, tuple) else (result,))))


def write_pictures(folder: Path, prefix: str, count: int, seed: int) -> list[Path]:
    """`count` pictures with captions, of content no other visitor uploads (their own seeds)."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = list(COLORS.items())
    files = []
    for k in range(count):
        color_name, color = colors[(seed + k) % len(colors)]
        shape = SHAPES[(seed + k) % len(SHAPES)]
        picture = folder / f"{prefix}{k}.png"
        draw_shape(shape, color, (64, 64), seed=seed * 1000 + k).save(picture)
        caption = picture.with_suffix(".txt")
        caption.write_text(f"a photo of a {color_name} {shape}\n", encoding="utf-8")
        files += [picture, caption]
    return files


def connect(url: str) -> Client:
    # gradio_client gives up on a plain HTTP request (a file's upload) after httpx's 5 s, where a browser waits
    # minutes: a visitor here waits as long as a poll may. Never on a read, though: the stream that brings every
    # answer may be quiet for longer under load, and a timeout there would cancel every call waiting on it.
    timeout = {"timeout": httpx.Timeout(POLL_TIMEOUT, read=None)}
    return Client(url, verbose=False, download_files=False, analytics_enabled=False, httpx_kwargs=timeout)


# ---- the run ------------------------------------------------------------------------------------------------
def step_of(trainer: Client) -> int:
    """The step the trainer's live view shows, 0 before the first."""
    found = STEP.search(html.unescape(str(trainer.predict(api_name="/progress")[0])))
    return int(found.group(1)) if found else 0


def start_run(trainer: Client, workdir: Path) -> str:
    """A new run by `trainer`; its name (one of its own, since an app given by --url may have run this before)."""
    answer = text(trainer.predict(upload=upload_of(write_pictures(workdir, "trainer-", 4, 99)), api_name="/upload"))
    if "Added 4 pictures" not in answer:
        raise RuntimeError(f"the trainer's upload failed: {answer}")
    name = f"load-test-{uuid.uuid4().hex[:8]}"
    answer = text(trainer.predict(run_name=name, **RUN, api_name="/start"))
    if f"Training {name} started" not in answer:
        raise RuntimeError(f"the run did not start: {answer}")
    return name


def wait_for_step(trainer: Client, at_least: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while (step := step_of(trainer)) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the run never reached step {at_least}")
        time.sleep(0.2)
    return step


def stop_run(trainer: Client, timeout: float = 120) -> None:
    trainer.predict(api_name="/stop")
    deadline = time.monotonic() + timeout
    while "stopped at step" not in html.unescape(str(trainer.predict(api_name="/progress")[0])):
        if time.monotonic() > deadline:
            raise RuntimeError("the run did not stop")
        time.sleep(0.2)


def check_steps(run: RunFolder) -> list[str]:
    """No step lost: one metrics line per step from 1 to the last, and the status stopped at that step."""
    problems = []
    steps = [row.get("step") for row in run.read_metrics()]
    if not steps or steps != list(range(1, len(steps) + 1)):
        missing = sorted(set(range(1, max(steps or [0]) + 1)) - set(steps))
        repeated = sorted({step for step in steps if steps.count(step) > 1})
        problems.append(
            f"metrics.jsonl does not count its steps one by one: missing {missing[:10]}, twice {repeated[:10]}"
        )
    status = run.read_status()
    if status.get("status") != STOPPED:
        problems.append(f"the run's status is {status.get('status')!r}, not {STOPPED!r}")
    if steps and status.get("step") != steps[-1]:
        problems.append(f"the status says step {status.get('step')}, metrics.jsonl ends at step {steps[-1]}")
    return problems


# ---- the visitors -------------------------------------------------------------------------------------------
def upload_of(files: list[Path]) -> list:
    return [handle_file(str(path)) for path in files]


def visit(visitor: Visitor, url: str, workdir: Path, deadline: float) -> None:
    """One visitor's session: upload their pictures, then poll the live view twice a second until `deadline`,
    editing their captions every few seconds; at least one edit and one poll whatever the deadline, so that
    every visitor has done everything once. One call at a time, unlike a page whose timer polls during an
    upload: a gradio_client with two calls in flight may have one cancelled under it when the server closes
    its stream. Nothing here raises: what goes wrong is recorded."""
    try:
        visitor.client = client = connect(url)
    except Exception as error:  # a visitor who can't connect is a failure to report, not a crash
        visitor.errors.append(f"visitor {visitor.index} could not connect: {error!r}")
        return
    files = write_pictures(workdir / f"visitor-{visitor.index}", visitor.prefix, PICTURES_PER_CLIENT, visitor.index)
    # The trigger word first, so that every visitor's captions hold it; then changes that always change them all.
    edits = [
        ("/add_trigger", {"trigger": visitor.trigger}),
        ("/replace", {"find": "photo", "replace_with": "picture"}),
        ("/replace", {"find": "picture", "replace_with": "photo"}),
    ]
    try:
        began = time.monotonic()
        answer = text(client.predict(upload=upload_of(files), api_name="/upload"))
        visitor.upload_seconds.append(time.monotonic() - began)
        visitor.answers.append(answer)
        if f"Added {PICTURES_PER_CLIENT} pictures" in answer:
            visitor.pictures = PICTURES_PER_CLIENT
        else:
            visitor.errors.append(f"visitor {visitor.index}'s upload: {answer[:300]}")
        next_edit = time.monotonic()
        while True:
            if time.monotonic() >= next_edit:
                api_name, values = edits[len(visitor.edit_seconds) % len(edits)]
                began = time.monotonic()
                answer = text(client.predict(**values, api_name=api_name))
                visitor.edit_seconds.append(time.monotonic() - began)
                visitor.answers.append(answer)
                if api_name == "/replace" and f"{visitor.pictures} captions changed" not in answer:
                    visitor.errors.append(f"visitor {visitor.index}'s {api_name} {values}: {answer[:300]}")
                next_edit = time.monotonic() + EDIT_EVERY
            began = time.monotonic()
            try:
                visitor.answers.append(text(client.submit(api_name="/progress").result(timeout=POLL_TIMEOUT)))
                visitor.latencies.append(time.monotonic() - began)
            except Exception as error:  # an unanswered poll is what this counts
                visitor.unanswered.append(f"visitor {visitor.index}'s poll {visitor.polls + 1}: {error!r}")
            if time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, POLL_EVERY - (time.monotonic() - began)))
        visitor.answers.append(text(client.predict(run_pick=None, api_name="/list_runs")))
    except Exception as error:  # a refused upload or edit: reported with the rest
        visitor.errors.append(f"visitor {visitor.index}: {error!r}")


def check_answers(visitors: list[Visitor], run_name: str) -> list[str]:
    """Nothing a visitor was answered names the run they did not start, or another visitor's files or words."""
    leaks = []
    for visitor in visitors:
        seen = " ".join(visitor.answers)
        foreign = [run_name, "trainer-"] + [
            word for other in visitors if other is not visitor for word in (other.prefix, other.trigger)
        ]
        leaks += [f"visitor {visitor.index} was shown {word!r}" for word in foreign if word in seen]
    return leaks


def check_staging(runs_dir: Path, visitors: list[Visitor], trainer: Client, only_us: bool) -> list[str]:
    """Each visitor has one staging folder, theirs, holding exactly their pictures, captioned with their words;
    where `only_us` used the app, no other staging folder (one made for a visitor the app mistook) is there."""
    folders = [folder for folder in (runs_dir / STAGING_DIR).iterdir() if folder.is_dir()]
    leaks = []
    if only_us:
        known = {anonymous(f"session:{trainer.session_hash}")} | {visitor.owner for visitor in visitors}
        leaks += [
            f"staging folder {folder.name} is {read_owner(folder)}'s"
            for folder in folders
            if read_owner(folder) not in known
        ]
    for visitor in visitors:
        if visitor.client is None:
            continue
        theirs = [folder for folder in folders if read_owner(folder) == visitor.owner]
        if len(theirs) != 1:
            leaks.append(f"visitor {visitor.index} owns {len(theirs)} staging folders, not 1")
            continue
        pictures = picture_files(theirs[0])
        strangers = [picture.name for picture in pictures if not picture.name.startswith(visitor.prefix)]
        # An upload whose answer never came may still have landed (that failure is reported on its own).
        if (visitor.upload_seconds and len(pictures) != visitor.pictures) or strangers:
            leaks.append(
                f"visitor {visitor.index}'s staging holds {len(pictures)} pictures, uploaded {visitor.pictures}; "
                f"not theirs: {strangers}"
            )
        for caption in sorted(theirs[0].glob("*.txt")):
            words = caption.read_text(encoding="utf-8")
            others = [other.trigger for other in visitors if other is not visitor and other.trigger in words]
            if others or (visitor.edit_seconds and visitor.trigger not in words):
                leaks.append(f"visitor {visitor.index}'s caption {caption.name} reads {words.strip()!r}")
    return leaks


# ---- the whole test -----------------------------------------------------------------------------------------
def run_load(
    clients: int = 20,
    seconds: float = 60,
    baseline: float = 15,
    url: str | None = None,
    runs_dir: Path | None = None,
    log: Path | None = None,
) -> LoadResult:
    """Start the app (unless `url` names one), a run, then the load; check and return what happened."""
    workdir = Path(tempfile.mkdtemp(prefix="lora-load-"))
    process = None
    try:
        if url is None:
            runs_dir = runs_dir or workdir / "runs"
            log = log or workdir / "app.log"
            process, url = start_app(runs_dir, log, SPACE)
        trainer = connect(url)
        run_name = start_run(trainer, workdir / "trainer")
        # The run alone first: its speed without visitors, to compare with.
        first = wait_for_step(trainer, 1)
        began = time.monotonic()
        time.sleep(baseline)
        alone = (step_of(trainer) - first) / (time.monotonic() - began) if baseline > 0 else None

        visitors = [Visitor(index) for index in range(clients)]
        step_before, began = step_of(trainer), time.monotonic()
        threads = [
            threading.Thread(target=visit, args=(visitor, url, workdir, began + seconds), daemon=True)
            for visitor in visitors
        ]
        for thread in threads:
            thread.start()
        for thread in threads:  # a visitor's last call may still be waiting at the end: it gets its timeout
            thread.join(max(0.0, began + seconds + 3 * POLL_TIMEOUT - time.monotonic()))
        errors = [f"visitor {v.index} never ended" for v, t in zip(visitors, threads, strict=True) if t.is_alive()]
        load_seconds, steps = time.monotonic() - began, step_of(trainer) - step_before
        stop_run(trainer)

        # Each close waits a moment for the client's heartbeat to end: all at once, that is one moment.
        with ThreadPoolExecutor(len(visitors) + 1) as closing:
            closing.map(Client.close, [trainer, *(visitor.client for visitor in visitors if visitor.client)])

        checked = runs_dir is not None
        lost, leaks = [], check_answers(visitors, run_name)
        if checked:
            lost = check_steps(RunFolder(runs_dir / run_name))
            leaks += check_staging(runs_dir, visitors, trainer, only_us=process is not None)
        for visitor in visitors:
            errors += visitor.errors
        if process is not None:
            stop_app(process)
            process = None
            if "Traceback" in log.read_text():
                errors.append(f"the app logged a traceback: see {log}")
        return LoadResult(
            clients=clients,
            seconds=load_seconds,
            latencies=[latency for visitor in visitors for latency in visitor.latencies],
            unanswered=[poll for visitor in visitors for poll in visitor.unanswered],
            upload_seconds=[seconds for visitor in visitors for seconds in visitor.upload_seconds],
            edit_seconds=[seconds for visitor in visitors for seconds in visitor.edit_seconds],
            steps_during_load=steps,
            steps_per_second=steps / load_seconds,
            baseline_steps_per_second=alone,
            lost_steps=lost,
            leaks=leaks,
            errors=errors,
            checked_files=checked,
        )
    finally:
        if process is not None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="visitors at once (default 20)")
    parser.add_argument("--seconds", type=float, default=60, help="how long they keep at it (default 60)")
    parser.add_argument("--baseline", type=float, default=15, help="seconds of the run alone first; 0: none")
    parser.add_argument("--url", help="an app already running as a Space (default: start one)")
    parser.add_argument("--runs-dir", type=Path, help="that app's runs folder, for the checks of its files")
    args = parser.parse_args()
    if args.runs_dir and not args.url:
        parser.error("--runs-dir is for an app given with --url; without it the app gets a temporary folder")
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())  # before: what else this machine was doing
    result = run_load(args.clients, args.seconds, args.baseline, args.url, args.runs_dir)
    print(f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, load average {load}")
    print(result.table())
    for failure in result.failures:
        print("FAILED:", failure)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
