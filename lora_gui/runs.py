"""A run folder: where everything a run produces lives, so nothing lives only in memory.

What each file holds is written once, in docs/ARCHITECTURE.md ("A run folder").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.atomic import write_text_atomic
from lora_gui.errors import ConfigError, LoraFileError

DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
TRAINER_STATE = "trainer_state.json"
STATUS_FILE = "status.json"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SAMPLE = re.compile(r"^step-(\d+)-(\d+)\.png$")


# Starts the owner's tag in a run folder's name where a visitor's run name was already another's; a run name never
# holds it (check_run_name), so no one can type a tagged folder's name.
PRIVATE_MARK = "~"


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser().resolve())

    @property
    def name(self) -> str:
        """The run's name as its owner gave it: a folder whose name another visitor held has a tag of its owner
        after PRIVATE_MARK (see ui/folders.py), which is no part of the name they see."""
        return self.path.name.split(PRIVATE_MARK, 1)[0]

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def dataset(self) -> Path:
        return self.path / "dataset"

    @property
    def control(self) -> Path:
        """An edit run's "before" pictures, under the names of their "after" pictures in dataset/ (`control_data`)."""
        return self.path / "control"

    @property
    def data_report(self) -> Path:
        return self.path / "data_report.json"

    def write_skipped(self, skipped: list[str]) -> None:
        """Record the pictures left out of dataset/, each as 'name: reason'."""
        write_text_atomic(self.data_report, json.dumps({"skipped": skipped}, indent=2))

    def read_skipped(self) -> list[str]:
        return [str(each) for each in _read_json(self.data_report).get("skipped", [])]

    @property
    def validation_pictures(self) -> Path:
        """Where a run's own validation pictures are copied, when they came from a folder (`validation_data`)."""
        return self.path / "validation"

    @property
    def validation_record(self) -> Path:
        """Which pictures the validation loss is measured on (validation.json)."""
        return self.path / "validation.json"

    def write_validation(self, folder: Path, pictures: list[str], note: str) -> None:
        """Record the validation pictures (their names in `folder`: dataset/ when held out of it), and what was
        done in words (why there are none, on a set too small to spare any)."""
        values = {"folder": folder.name, "pictures": pictures, "note": note}
        write_text_atomic(self.validation_record, json.dumps(values, indent=2) + "\n")

    def held_out(self) -> list[str]:
        """The pictures of dataset/ held out of training for validation (never trained on)."""
        values = _read_json(self.validation_record)
        return [str(name) for name in values.get("pictures", [])] if values.get("folder") == self.dataset.name else []

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def diffusers_lora(self) -> Path:
        return self.path / DIFFUSERS_LORA

    @property
    def kohya_lora(self) -> Path:
        """`<run name>.safetensors`, the name A1111 and ComfyUI list it under."""
        path = self.path / f"{self.name}.safetensors"
        return path.with_name(f"{self.name}-kohya.safetensors") if path.name == DIFFUSERS_LORA else path

    @property
    def best_lora(self) -> Path:
        """`<run name>-best.safetensors`: the LoRA of the step with the lowest validation loss, in kohya's layout."""
        return self.path / f"{self.name}-best.safetensors"

    @property
    def lora_info(self) -> Path:
        return self.path / "lora_info.json"

    @property
    def model_card(self) -> Path:
        return self.path / "README.md"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first. A half-written one (a crash mid-save) has no state file."""
        found = []
        if self.checkpoints.is_dir():
            for folder in self.checkpoints.glob("step-*"):
                if folder.is_dir() and (folder / TRAINER_STATE).is_file() and folder.name[5:].isdigit():
                    found.append((int(folder.name[5:]), folder))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        checkpoints = self.list_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def prune_checkpoints(self, keep: int) -> None:
        for _, folder in self.list_checkpoints()[:-keep]:
            shutil.rmtree(folder, ignore_errors=True)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Drop lines logged after `last_step`: a resumed run redoes those steps."""
        rows = [row for row in self.read_metrics() if row.get("step", 0) <= last_step]
        write_text_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    # ---- status: what happened to the run, so a page opened later (or a restarted app) can tell --
    @property
    def status_file(self) -> Path:
        return self.path / STATUS_FILE

    def write_status(self, status: str, **details: Any) -> None:
        values = {"status": status, "time": time.time(), **details}
        write_text_atomic(self.status_file, json.dumps(values, indent=2) + "\n")

    def read_status(self) -> dict[str, Any]:
        try:
            values = json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return values if isinstance(values, dict) else {}

    def lora_files(self) -> list[Path]:
        """Every LoRA file of the run (diffusers and any other format written beside it)."""
        return sorted(self.path.glob("*.safetensors"))

    def downloadable_files(self) -> list[Path]:
        """What a person may want from a run: its LoRA files, settings, log and metrics."""
        return sorted({*self.lora_files(), *(p for p in (self.config, self.log, self.metrics) if p.is_file())})

    def sample_images(self) -> list[tuple[int, int, Path]]:
        """(step, prompt number, image) of every preview image, in the order they were made."""
        found = []
        for path in self.samples.glob("step-*.png") if self.samples.is_dir() else []:
            match = _SAMPLE.match(path.name)
            if match:
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)


@dataclass
class ValidationCurve:
    """The validation loss over a run (`val_loss` in metrics.jsonl): its best step, the lowest loss (the earliest of
    equal ones), and how many measurements came since without beating it. The loop keeps one, a resumed run
    rebuilds it from its metrics, and pages read it the same way."""

    points: list[tuple[int, float]] = field(default_factory=list)
    best: tuple[int, float] | None = None  # (step, loss)
    since_best: int = 0

    def add(self, step: int, loss: float) -> bool:
        """Record a measurement; whether it is a new best."""
        self.points.append((step, loss))
        if self.best is None or loss < self.best[1]:
            self.best, self.since_best = (step, loss), 0
            return True
        self.since_best += 1
        return False

    def stalled(self, patience: int) -> bool:
        """Whether `patience` measurements in a row did not improve on the best (never, with a patience of 0)."""
        return bool(patience) and self.since_best >= patience

    @classmethod
    def of(cls, points: Iterable[tuple[int, float]]) -> ValidationCurve:
        curve = cls()
        for step, loss in points:
            curve.add(step, loss)
        return curve

    @classmethod
    def from_metrics(cls, rows: list[dict[str, Any]]) -> ValidationCurve:
        return cls.of((row["step"], row["val_loss"]) for row in rows if row.get("val_loss") is not None)

    def summary(self) -> str:
        """The curve in words: where it was lowest, and whether it still improves."""
        if self.best is None:
            return ""
        step, loss = self.best
        if not self.since_best:
            return f"Validation loss {loss:.4f} at step {step}: the lowest so far."
        latest = self.points[-1][1]
        return (
            f"Lowest validation loss {loss:.4f} at step {step}; {self.since_best} measurement"
            f"{'s' if self.since_best > 1 else ''} since without improving (latest {latest:.4f})."
        )


@dataclass(frozen=True)
class TrainingRecord:
    """What the loop knows when it saves a LoRA and the rest of the run folder does not hold."""

    family: str
    prediction_type: str  # the objective's: "epsilon" or "v_prediction" (the noise scheduler's), or "flow"
    base_model_name: str  # kohya's ss_sd_model_name: a local model's file or folder name, else the Hub id
    base_model_hub_id: str | None  # the Hub id the model card links to; None for a local model
    steps: int
    total_steps: int
    epoch: float  # passes over the images so far
    seconds: float  # time spent training, across stops and resumes
    preview_prompts: list[str]  # samples/step-N-K.png shows prompt K
    finished_at: float  # unix time of the save
    variant: str = ""  # which of the family's models (Flux.1: dev or schnell); "" where it does not matter

    @classmethod
    def now(
        cls,
        family: str,
        prediction_type: str,
        base_model: str,
        steps: int,
        total_steps: int,
        epoch: float,
        seconds: float,
        preview_prompts: list[str],
        variant: str = "",
    ) -> TrainingRecord:
        # Whether the base model is a local path is known only now: it may be moved later.
        local = Path(base_model).expanduser()
        name, hub_id = (local.resolve().name, None) if local.exists() else (base_model, base_model)
        return cls(
            family,
            prediction_type,
            name,
            hub_id,
            steps,
            total_steps,
            epoch,
            seconds,
            preview_prompts,
            time.time(),
            variant,
        )

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run: RunFolder) -> TrainingRecord:
        try:
            return cls(**json.loads(run.lora_info.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise LoraFileError(
                f"{run.path} has no {run.lora_info.name}, which the LoRA's metadata is built from: it was saved "
                "by an older version of this app, or training has not saved a LoRA yet"
            ) from None
        except (json.JSONDecodeError, TypeError) as error:
            raise LoraFileError(f"{run.lora_info} is damaged ({error}); train the run again to rebuild it") from None


# Statuses as a run folder records them; "running" or "queued" found on disk with no live job
# means the app was killed mid-run, which `summarize` reports as interrupted and `record_interrupted`
# writes down when the app starts again.
QUEUED, RUNNING, FINISHED, STOPPED, FAILED, CANCELLED, INTERRUPTED = (
    "queued",
    "running",
    "finished",
    "stopped",
    "failed",
    "cancelled",
    "interrupted",
)


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: Path
    created: float
    status: str
    steps_done: int
    total_steps: int
    last_loss: float | None
    message: str
    base_model: str
    resolution: int | None
    has_lora: bool
    resumable: bool
    ended: float | None = None  # when it finished, stopped, failed or was cancelled or interrupted (unix time)


def summarize(path: str | Path) -> RunSummary:
    """What a run folder says about its run, whoever made it (the app or the command line)."""
    run = RunFolder(Path(path))
    saved = run.read_status()
    metrics = run.read_metrics()
    latest = run.latest_checkpoint()
    config = _read_json(run.config)
    steps_done = max(metrics[-1]["step"] if metrics else 0, latest[0] if latest else 0)
    total = int(saved.get("total_steps") or config.get("max_steps") or 0)
    has_lora = run.diffusers_lora.is_file()
    status, message = saved.get("status", ""), str(saved.get("message", ""))
    if status in (QUEUED, RUNNING):
        status, message = INTERRUPTED, message or interrupted_message(run, status, steps_done)
    elif not status:  # a run made by the command line; one whose validation loss stopped improving ended early
        ended = steps_done >= total or ValidationCurve.from_metrics(metrics).stalled(int(config.get("early_stop") or 0))
        status = FINISHED if has_lora and ended else STOPPED if has_lora else INTERRUPTED
    created = saved.get("created") or (run.config.stat().st_mtime if run.config.is_file() else run.path.stat().st_mtime)
    return RunSummary(
        name=run.name,
        path=run.path,
        created=float(created),
        status=status,
        steps_done=steps_done,
        total_steps=total,
        last_loss=metrics[-1].get("loss") if metrics else None,
        message=message,
        base_model=str(config.get("base_model", "")),
        resolution=config.get("resolution"),
        has_lora=has_lora,
        resumable=latest is not None and status != FINISHED,
        ended=_ended_at(saved, status),
    )


def _ended_at(saved: dict[str, Any], status: str) -> float | None:
    """When the run ended, from its status file: the time of its last write, once the run is over. Not for a run an
    app that was killed left going: its status was written when the app started again, not when it stopped."""
    if status != saved.get("status") or status not in (FINISHED, STOPPED, FAILED, CANCELLED):
        return None
    when = saved.get("time")
    return float(when) if isinstance(when, (int, float)) else None


def interrupted_message(run: RunFolder, status: str, step: int) -> str:
    """What a person reads about a run left queued or running when the app stopped without letting it save."""
    when = "before its turn came" if status == QUEUED else f"at step {step}"
    latest = run.latest_checkpoint()
    if latest is None:
        return f"Interrupted when the app stopped {when}. It saved no checkpoint: start it again as a new run."
    return f"Interrupted when the app stopped {when}. Resume continues from the last checkpoint (step {latest[0]})."


def record_interrupted(runs_dir: str | Path, is_live: Callable[[Path], bool]) -> list[str]:
    """Write `interrupted` into the status of every run left queued or running by an app that was killed
    (SIGKILL, a power cut), so that the folder tells the truth to whatever reads it next. Runs `is_live` says
    this process is working on are left alone. Returns the names of the runs marked."""
    marked = []
    for summary in list_runs(runs_dir):
        run = RunFolder(summary.path)
        saved = run.read_status()
        if saved.get("status") in (QUEUED, RUNNING) and not is_live(run.path):
            kept = {key: value for key, value in saved.items() if key not in ("status", "time", "message")}
            run.write_status(INTERRUPTED, **{**kept, "step": summary.steps_done, "message": summary.message})
            marked.append(run.name)
    return marked


def list_runs(runs_dir: str | Path, include: Callable[[Path], bool] = lambda folder: True) -> list[RunSummary]:
    """Every run under `runs_dir` that `include` takes (a visitor's own), newest first; only those are read.
    Folders starting with a dot are the app's own; folders without settings or a status are not runs."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    folders = [
        p
        for p in runs_dir.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and ((p / "config.json").is_file() or (p / STATUS_FILE).is_file())
        and include(p)
    ]
    return sorted((summarize(p) for p in folders), key=lambda s: s.created, reverse=True)


def delete_run(run_dir: str | Path) -> None:
    """Delete a run folder and everything in it (the caller makes sure no job is using it)."""
    shutil.rmtree(RunFolder(Path(run_dir)).path)


def check_run_name(name: str) -> str:
    """The name, stripped, if it makes a safe folder name; a ConfigError saying how to fix it if not."""
    name = name.strip()
    if not _RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} can't be a run name: use letters, digits, '-', '_' or '.', start with a letter or digit, "
            "at most 64 characters (for example my-first-lora)"
        )
    return name


def suggest_run_name(runs_dir: str | Path, stem: str = "my-lora") -> str:
    """The first of stem-1, stem-2, ... that no folder in `runs_dir` uses yet."""
    number = 1
    while (Path(runs_dir) / f"{stem}-{number}").exists():
        number += 1
    return f"{stem}-{number}"


def default_runs_dir() -> Path:
    """/data/runs on a Hugging Face Space with persistent storage (it survives restarts), else ./runs."""
    data = Path("/data")
    if data.is_dir() and os.access(data, os.W_OK):
        return data / "runs"
    return Path("runs")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return values if isinstance(values, dict) else {}
