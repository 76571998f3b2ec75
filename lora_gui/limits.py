"""Quotas and cleanup for an app that strangers share (a Hugging Face Space): how much one visitor may upload and
queue, how much free disk a run needs before it starts, and when forgotten staging folders and old runs go.

The server's owner sets them with environment variables; `0`, `none` or `off` turns one off:

| variable                         | what it limits                                          | on a Space | elsewhere |
| -------------------------------- | ------------------------------------------------------- | ---------- | --------- |
| `LORA_GUI_MAX_FILE_MB`           | one uploaded file, a zip included (megabytes)           | 500        | none      |
| `LORA_GUI_MAX_STAGING_MB`        | all the pictures and captions one visitor has staged    | 2000       | none      |
| `LORA_GUI_MAX_FILES`             | pictures staged per visitor                             | 1000       | none      |
| `LORA_GUI_MAX_RUNS_PER_VISITOR`  | runs one visitor has queued or training                 | 1          | none      |
| `LORA_GUI_MAX_QUEUED_RUNS`       | runs queued or training, all visitors together          | 10         | none      |
| `LORA_GUI_MAX_UPLOADS_MB`        | Gradio's upload folder, all visitors together           | 5000       | none      |
| `LORA_GUI_MIN_FREE_GB`           | free disk in the runs folder before a run starts        | 2          | 2         |
| `LORA_GUI_STAGING_DAYS`          | days a staging folder may stay untouched before it goes | 7          | none      |
| `LORA_GUI_RUN_DAYS`              | days an ended run is kept (only if the owner sets it)   | none       | none      |

Sizes count in decimal units (1 MB = 1,000,000 bytes), as disks are sold and as the rest of the app writes them.
The free-disk floor applies everywhere: a disk that fills up mid-run loses the run's work on any machine. Old
runs are never deleted unless the owner asks, since a run is what a visitor came for.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_gui import runs
from lora_gui.errors import ConfigError, LoraGuiError

log = logging.getLogger(__name__)

MAX_FILE_MB_ENV = "LORA_GUI_MAX_FILE_MB"
MAX_STAGING_MB_ENV = "LORA_GUI_MAX_STAGING_MB"
MAX_FILES_ENV = "LORA_GUI_MAX_FILES"
MAX_RUNS_PER_VISITOR_ENV = "LORA_GUI_MAX_RUNS_PER_VISITOR"
MAX_QUEUED_RUNS_ENV = "LORA_GUI_MAX_QUEUED_RUNS"
MAX_UPLOADS_MB_ENV = "LORA_GUI_MAX_UPLOADS_MB"
MIN_FREE_GB_ENV = "LORA_GUI_MIN_FREE_GB"
STAGING_DAYS_ENV = "LORA_GUI_STAGING_DAYS"
RUN_DAYS_ENV = "LORA_GUI_RUN_DAYS"

MB, GB, DAY = 1_000_000, 1_000_000_000, 24 * 60 * 60
UPLOAD_GRACE_SECONDS = 600  # an upload younger than this may still be on its way into a staging folder
_OFF = ("0", "none", "off")
# A run that has ended in any way; one still queued or running on disk but without a live job was left by a
# killed app, and reads as interrupted (runs.summarize).
ENDED = (runs.FINISHED, runs.STOPPED, runs.FAILED, runs.CANCELLED, runs.INTERRUPTED)


@dataclass(frozen=True)
class Limits:
    """What one visitor may use of a shared server, and how long what they leave is kept. None: no limit."""

    max_file_bytes: int | None = None  # one uploaded file, a zip included
    max_staging_bytes: int | None = None  # all the pictures and captions one visitor has staged
    max_staging_files: int | None = None  # pictures staged per visitor
    max_runs_waiting: int | None = None  # runs one visitor has queued or training
    max_runs_queued: int | None = None  # runs queued or training, all visitors together
    max_upload_folder_bytes: int | None = None  # Gradio's upload folder, all visitors together
    min_free_bytes: int | None = None  # free disk in the runs folder before a run starts
    staging_days: int | None = None  # a staging folder untouched this long is deleted
    run_days: int | None = None  # ended runs older than this are deleted

    @classmethod
    def from_environment(cls, on_space: bool) -> Limits:
        """The server's limits: its environment variables, else the defaults for a Space or for one person's
        computer. A value that makes no sense raises a ConfigError naming the variable."""
        values = {}
        for setting in _SETTINGS:
            raw = os.environ.get(setting.env, "").strip()
            default = setting.on_space if on_space else setting.elsewhere
            values[setting.field] = setting.read(raw) if raw else _scaled(default, setting.scale)
        return cls(**values)


@dataclass(frozen=True)
class _Setting:
    """One row of the table above: which field an environment variable sets, in what unit, and its defaults."""

    field: str
    env: str
    expects: str  # the unit and an example, for the error message
    scale: int  # the field's units (bytes, pictures, days) per unit of the variable
    on_space: float | None
    elsewhere: float | None
    whole: bool = True  # counts and days are whole numbers; sizes may have a fraction (1.5 GB)

    def read(self, raw: str) -> int | None:
        if raw.lower() in _OFF:
            return None
        try:
            value = int(raw) if self.whole else float(raw)
        except ValueError:
            value = -1
        if not 0 <= value < math.inf:  # a negative, nan or inf too
            raise ConfigError(
                f"{self.env} must be a {'whole ' if self.whole else ''}number of {self.expects} "
                f"(or 0, none or off for no limit), not {raw!r}; "
                "fix it in the server's settings (on a Space: Settings, Variables and secrets) and restart"
            )
        return _scaled(value, self.scale)


def _scaled(value: float | None, scale: int) -> int | None:
    return None if value is None or value == 0 else int(value * scale)


_SETTINGS = (
    _Setting("max_file_bytes", MAX_FILE_MB_ENV, "megabytes, such as 500", MB, 500, None, whole=False),
    _Setting("max_staging_bytes", MAX_STAGING_MB_ENV, "megabytes, such as 2000", MB, 2000, None, whole=False),
    _Setting("max_staging_files", MAX_FILES_ENV, "pictures, such as 1000", 1, 1000, None),
    _Setting("max_runs_waiting", MAX_RUNS_PER_VISITOR_ENV, "runs, such as 1", 1, 1, None),
    _Setting("max_runs_queued", MAX_QUEUED_RUNS_ENV, "runs, such as 10", 1, 10, None),
    _Setting("max_upload_folder_bytes", MAX_UPLOADS_MB_ENV, "megabytes, such as 5000", MB, 5000, None, whole=False),
    _Setting("min_free_bytes", MIN_FREE_GB_ENV, "gigabytes, such as 2", GB, 2, 2, whole=False),
    _Setting("staging_days", STAGING_DAYS_ENV, "days, such as 7", 1, 7, None),
    _Setting("run_days", RUN_DAYS_ENV, "days, such as 30", 1, None, None),
)


def format_size(size: float) -> str:
    """A size as a person reads it: 612 MB, 1.2 GB, 2 GB."""
    for scale, unit in ((GB, "GB"), (MB, "MB"), (1000, "kB")):
        if size >= scale:
            value = size / scale
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return f"{text.removesuffix('.0')} {unit}"
    return f"{int(size)} bytes"


# ---- checks before a run starts ------------------------------------------------------------------
def check_free_disk(folder: Path, limits: Limits) -> None:
    """Refuse to start a run on a disk too full to hold its checkpoints and LoRA files: one that fills up
    mid-run fails and can lose what it saved."""
    if limits.min_free_bytes is None:
        return
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:  # the runs folder may not be made yet
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < limits.min_free_bytes:
        raise LoraGuiError(
            f"the server's disk has only {format_size(free)} free, and a run needs at least "
            f"{format_size(limits.min_free_bytes)} (its checkpoints and LoRA files): delete old runs in the Runs "
            "tab, or ask the server's owner to free space"
        )


def check_runs_waiting(waiting: int, limits: Limits) -> None:
    """Refuse a visitor's next run while they already have as many queued or training as the server allows, so
    one visitor can't fill the one GPU's queue."""
    if limits.max_runs_waiting is None or waiting < limits.max_runs_waiting:
        return
    runs_text = f"{waiting} run" + ("" if waiting == 1 else "s")
    raise LoraGuiError(
        f"you already have {runs_text} queued or training, and this server takes at most "
        f"{limits.max_runs_waiting} per visitor: wait for {'it' if waiting == 1 else 'one'} to end (or stop it), "
        "then start this one"
    )


def check_queue(queued: int, limits: Limits) -> None:
    """Refuse any visitor's run while the queue holds as many as the server allows. A visitor who is not signed in
    is known only by their browser, and a script can be a new browser every time: this is what bounds it."""
    if limits.max_runs_queued is None or queued < limits.max_runs_queued:
        return
    raise LoraGuiError(
        f"the queue is full: this server queues at most {limits.max_runs_queued} runs at a time; try again when "
        "one has ended"
    )


# ---- cleanup ------------------------------------------------------------------------------------
def expire_untouched(root: Path, days: int | None, now: float | None = None) -> list[str]:
    """Delete the folders in `root` nobody has touched for `days` (staging folders: a visitor who left and never
    came back); returns their names. Touched means any file in it, or the folder itself, changed."""
    if days is None or not root.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - days * DAY
    expired = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.is_symlink() and _newest_change(folder) < cutoff and _delete(folder):
            expired.append(folder.name)
    return expired


def make_upload_room(
    folder: Path, limit: int | None, grace: float = UPLOAD_GRACE_SECONDS, now: float | None = None
) -> bool:
    """Whether Gradio's upload folder (every file sent to the server, and the copies handed to pages) has room for
    one more upload under `limit` bytes. When it is full, its files older than `grace` seconds go first, oldest
    first: an upload is copied into its visitor's staging folder as soon as its event runs, so an older one was used
    or abandoned, and a page that lost a copy it was handed asks for it again. Anything sent to that route counts,
    whatever its event would have refused, so a stranger's raw uploads can't fill the disk."""
    if limit is None or not Path(folder).is_dir():
        return True
    files = []
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                status = os.stat(path, follow_symlinks=False)
            except OSError:  # removed while we looked
                continue
            files.append((status.st_mtime, status.st_size, path))
    total = sum(size for _, size, _ in files)
    cutoff = (time.time() if now is None else now) - grace
    for changed, size, path in sorted(files):
        if total < limit or changed >= cutoff:
            break
        try:
            os.unlink(path)
            total -= size
            os.rmdir(os.path.dirname(path))  # Gradio keeps each file in a folder of its own
        except OSError:  # in use, gone, or a folder that still holds others
            pass
    return total < limit


def expire_runs(runs_dir: Path, limits: Limits, is_live: Callable[[Path], bool], now: float | None = None) -> list[str]:
    """Delete the runs that ended more than `run_days` ago (never one a job is working on: `is_live`); returns
    their names. When a run ended is its status file's time, else (a run made by the command line) the newest
    change to its folder or the files directly in it."""
    if limits.run_days is None:
        return []
    cutoff = (time.time() if now is None else now) - limits.run_days * DAY
    expired = []
    for summary in runs.list_runs(runs_dir):
        if summary.status not in ENDED or is_live(summary.path):
            continue
        if _ended_at(summary.path) < cutoff and _delete(summary.path, runs.delete_run):
            expired.append(summary.name)
    return expired


def _ended_at(path: Path) -> float:
    saved = runs.RunFolder(path).read_status().get("time")
    if isinstance(saved, (int, float)) and not isinstance(saved, bool):
        return float(saved)
    # No status time: a metrics file or log still being appended to keeps the run young.
    try:
        return max([path.stat().st_mtime, *(entry.stat().st_mtime for entry in path.iterdir() if entry.is_file())])
    except OSError:  # changed while we looked: it is not old
        return time.time()


def _newest_change(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(parent, name), follow_symlinks=False).st_mtime)
            except OSError:  # removed while we looked: it was touched just now
                return time.time()
    return newest


def _delete(folder: Path, delete: Callable[[Path], None] = shutil.rmtree) -> bool:
    try:
        delete(folder)
    except OSError as error:  # a file in use, or already gone: try again next time
        log.warning("could not delete %s: %s", folder, error)
        return False
    return True
