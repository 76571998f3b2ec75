"""The background runner: one worker thread trains the queued runs one after another.

A run belongs to the process, not to whoever started it: any browser tab (or a test) reads a
job's state at any time, and closing the tab that pressed Start changes nothing. One worker means
two runs can never fight over one GPU; a run submitted while another trains waits its turn. Captioning and the
Generate tab share the GPU with the runs through `gpu_owner.GpuOwner`, which a run asks before it loads anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui import data, events, run_dataset
from lora_gui.config import CHANGEABLE_ON_RESUME, TrainConfig
from lora_gui.downloads import DownloadProgress, HubToken
from lora_gui.errors import LoraGuiError
from lora_gui.events import Event
from lora_gui.gpu_owner import GpuOwner
from lora_gui.model_policy import ANY_BASE_MODEL, BaseModelPolicy
from lora_gui.owners import EVERYONE, LOCAL, Visitor, read_owner, write_owner
from lora_gui.runs import (
    CANCELLED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STOPPED,
    RunFolder,
    ValidationCurve,
    interrupted_message,
)
from lora_gui.training import train

log = logging.getLogger(__name__)

MAX_LOG_LINES = 500
ENDED = (FINISHED, STOPPED, FAILED, CANCELLED)
_ENDING_STATUS = {events.FINISHED: FINISHED, events.STOPPED: STOPPED, events.FAILED: FAILED}


@dataclass
class JobState:
    """Everything a page shows about one run. `snapshot()` hands out copies, so readers never race the worker."""

    job_id: int
    run_name: str
    run_dir: str
    status: str = QUEUED
    resume: bool = False
    step: int = 0
    total_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # the validation loss, where measured
    validating: bool = False  # whether the run measures a validation loss (it has pictures for it)
    images_per_second: float | None = None
    eta_seconds: float | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (image path, caption)
    log: list[str] = field(default_factory=list)
    message: str = ""  # what it is doing now ("Encoding images 3/8")
    download: DownloadProgress | None = None  # the base model's download, while it is going on
    error: str = ""
    files: list[str] = field(default_factory=list)  # LoRA files to download once it has ended
    device: str = ""
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


class Job:
    def __init__(
        self,
        job_id: int,
        config: TrainConfig,
        run_dir: Path,
        resume: bool,
        hub_token: HubToken = None,
        owner: str = LOCAL,
    ):
        self.config = config
        self.run = RunFolder(run_dir)
        self.owner = owner  # who may see and stop it (owners.py)
        # Only here, in memory, until the run takes it: never in the state pages read, nor in any file.
        self._hub_token = hub_token
        self.stop_requested = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._first_step: tuple[int, float] | None = None  # (step, time) of the first step this job ran
        self._state = JobState(job_id=job_id, run_name=self.run.name, run_dir=str(self.run.path), resume=resume)

    @property
    def job_id(self) -> int:
        return self._state.job_id

    def take_hub_token(self) -> HubToken:
        """The Hugging Face token given for this run's download, handed over once and forgotten."""
        token, self._hub_token = self._hub_token, None
        return token

    def snapshot(self) -> JobState:
        with self._lock:
            state = self._state
            return dataclasses.replace(
                state,
                losses=list(state.losses),
                val_losses=list(state.val_losses),
                samples=list(state.samples),
                log=list(state.log),
                files=list(state.files),
            )

    # ---- called by the worker thread ------------------------------------------------------------
    def on_event(self, event: Event) -> None:
        with self._lock:
            state = self._state
            if event.total_steps:
                state.step, state.total_steps = event.step, event.total_steps
            if event.kind == events.DOWNLOAD:
                self._on_download(DownloadProgress(**event.data))
                return
            state.download = None  # the run reports something else: its download is over
            if event.kind == events.MESSAGE:
                state.message = event.data["text"]
                self._log(event.data["text"])
            elif event.kind == events.STARTED:
                self._on_started(event)
            elif event.kind == events.STEP:
                state.losses.append((event.step, event.data["loss"]))
                if event.data.get("val_loss") is not None:
                    state.val_losses.append((event.step, event.data["val_loss"]))
                self._update_speed(event)
                every = max(1, event.total_steps // 20)
                if event.step % every == 0 or event.step == event.total_steps:
                    self._log(f"Step {event.step}/{event.total_steps}: loss {event.data['loss']:.4f}")
            elif event.kind == events.SAMPLES:
                for path, prompt in zip(event.data["paths"], event.data["prompts"], strict=True):
                    state.samples.append((path, f"step {event.step}: {prompt}"))
                self._log(f"Preview images at step {event.step}")
            elif event.kind == events.CHECKPOINT:
                self._log(f"Saved a resumable checkpoint at step {event.step}")
            elif event.kind in _ENDING_STATUS:
                self._on_ended(event)

    def _on_download(self, progress: DownloadProgress) -> None:
        state = self._state
        if state.download is None:
            self._log(f"Downloading {progress.repo}: {progress.size()}")
        state.download, state.message = progress, f"Downloading {progress.repo}"

    def _update_speed(self, event: Event) -> None:
        """Speed and time left averaged since the first step, previews and checkpoints included, so the
        estimate does not jump at every step the way the engine's per-window figure does."""
        state = self._state
        if self._first_step is None:
            self._first_step = (event.step, event.time)
            state.images_per_second, state.eta_seconds = event.data["images_per_second"], event.data["eta_seconds"]
            return
        steps, seconds = event.step - self._first_step[0], event.time - self._first_step[1]
        if steps > 0 and seconds > 0:
            images_per_step = self.config.batch_size * self.config.gradient_accumulation_steps
            state.images_per_second = steps * images_per_step / seconds
            state.eta_seconds = (event.total_steps - event.step) * seconds / steps

    def _on_started(self, event: Event) -> None:
        state, data = self._state, event.data
        state.device = data["device"]
        for skipped in data["skipped"]:
            self._log(f"Skipped {skipped}")
        resumed = f", resuming from step {data['resumed_from']}" if data["resumed_from"] is not None else ""
        self._log(
            f"Training a {data['family']} LoRA on {data['images']} images for {event.total_steps} steps "
            f"on {data['device']}{resumed}"
        )
        if data.get("validation"):
            self._log(data["validation"])
        state.validating = bool(data.get("validation_pictures"))
        if data["resumed_from"] is not None:  # the validation curve goes on from where it was, its best with it
            state.val_losses = ValidationCurve.from_metrics(self.run.read_metrics()).points
        state.message = "Training"

    def _on_ended(self, event: Event) -> None:
        state = self._state
        state.status = _ENDING_STATUS[event.kind]
        state.ended_at = event.time
        state.eta_seconds = None
        state.files = [str(path) for path in self.run.lora_files()]
        if event.kind == events.FAILED:
            state.error = event.data["message"]
            state.message = "Failed"
            self._log(f"Failed: {state.error}")
        elif event.kind == events.STOPPED:
            state.message = "Stopped"
            saved = "; the LoRA so far is saved" if event.data["lora"] else " before the first step; nothing saved"
            self._log(f"Stopped at step {event.step}{saved}")
        else:
            state.message = "Finished"
            self._log(f"Finished: {', '.join(Path(f).name for f in state.files)}")
            if event.data.get("message"):
                self._log(event.data["message"])

    def _log(self, line: str) -> None:
        self._state.log.append(f"{time.strftime('%H:%M:%S')}  {line}")
        del self._state.log[:-MAX_LOG_LINES]

    def set_status(self, status: str, error: str = "") -> None:
        with self._lock:
            self._state.status = status
            if status == RUNNING:
                self._state.started_at = time.time()
                self._state.message = "Starting"
            if error and not self._state.error:
                self._state.error = error
                self._log(f"Failed: {error}")
            if status in ENDED and self._state.ended_at is None:
                self._state.ended_at = time.time()
        self.save_status()

    def record_unfinished(self) -> None:
        """The app exits before this job ended (it did not stop in the time given): a queued job is cancelled,
        a running one interrupted, as a restarted app would find it, rather than left queued or running."""
        with self._lock:
            state = self._state
            if state.status == QUEUED:
                state.status = CANCELLED
            elif state.status == RUNNING:
                state.status, state.error = INTERRUPTED, interrupted_message(self.run, state.status, state.step)
                self._log(state.error)
            else:
                return  # it ended in the meantime, and said how
        self.save_status()

    def save_status(self) -> None:
        """Record the status in the run folder, where the Runs tab (and a restarted app) finds it."""
        state = self.snapshot()
        self.run.write_status(
            state.status,
            created=self.run.read_status().get("created", state.submitted_at),  # a resumed run keeps its date
            step=state.step,
            total_steps=state.total_steps,
            message=state.error,
        )


class JobManager:
    """Queues runs and trains them one at a time on a single worker thread.

    Each run takes its turn on the GPU from `gpu` before it loads anything: it waits for captioning there to end
    and has the Generate tab's model unloaded, each said in its log (gpu_owner.py)."""

    def __init__(self, gpu: GpuOwner | None = None, model_policy: BaseModelPolicy = ANY_BASE_MODEL) -> None:
        self.gpu = gpu or GpuOwner()
        self.model_policy = model_policy  # which base models the runs may load (a Space: Hub ids only)
        self._jobs: dict[int, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._closing = False

    def submit(
        self, config: TrainConfig, run_dir: str | Path, *, resume: bool = False, hub_token: HubToken = None
    ) -> Job:
        """Queue a run; it starts at once if nothing else is training. Raises LoraGuiError if that
        run folder is already queued or training. `hub_token`: a Hugging Face token for downloading its
        base model (a gated one), kept in memory until then. The job belongs to the run folder's owner."""
        run = RunFolder(Path(run_dir))
        owner = read_owner(run.path)
        with self._lock:
            if self._closing:
                raise LoraGuiError("the app is shutting down: start the run again once it is back")
            busy = [job for job in self._jobs.values() if job.run.path == run.path and not job.done.is_set()]
            if busy:
                raise LoraGuiError(f"the run {run.name} is already {busy[0].snapshot().status}; wait for it to end")
            job = Job(next(self._ids), config, run.path, resume, hub_token, owner)
            self._jobs[job.job_id] = job
            run.path.mkdir(parents=True, exist_ok=True)
            job.set_status(QUEUED)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="lora-gui-trainer", daemon=True)
                self._worker.start()
        self._queue.put(job)
        log.info("Queued run %s (job %d)", run.name, job.job_id)
        return job

    def submit_new(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        pictures: str | Path,
        hub_token: HubToken = None,
        owner: str = LOCAL,
        before: str | Path | None = None,
    ) -> Job:
        """Queue a new run of `owner`'s on a folder of pictures as it is now (the app's staging folder, which its
        visitor may go on editing while the run waits its turn): the run's dataset/ is written from it at once,
        with hard links where the disk allows, and the run trains on that. With `before` (a folder of an edit's
        before pictures, the staging folder's), the pictures are the after halves of edit pairs: the run's control/
        is written beside dataset/ the same way, and the run trains on the pairs."""
        run = RunFolder(Path(run_dir))
        try:
            run.path.mkdir(parents=True)
        except FileExistsError:
            raise LoraGuiError(
                f"a run named {run.name} already exists: pick another name (or resume that one from the Runs tab)"
            ) from None
        try:
            write_owner(run.path, owner)
            scan = data.scan_folder(pictures, config.default_caption)
            if before is not None:
                scan = run_dataset.pair_with_controls(scan, before)
            run_dataset.copy_into_run(scan, run.dataset, link=True, control_dir=run.control)
            run.write_skipped([str(each) for each in scan.skipped])
        except BaseException:
            shutil.rmtree(run.path, ignore_errors=True)
            raise
        # Training pairs dataset/ with control/ when there is one; control_data says so in the run's config.json.
        control = {"control_data": str(run.control)} if scan.paired else {}
        return self.submit(config.replace(data=str(run.dataset), **control), run.path, hub_token=hub_token)

    def resume(self, run_dir: str | Path, hub_token: HubToken = None, changes: dict[str, Any] | None = None) -> Job:
        """Queue a stopped, failed or interrupted run to continue from its last checkpoint, with its saved
        settings but for `changes` to those a resume may change (config.CHANGEABLE_ON_RESUME; a lower learning
        rate after a divergence)."""
        run = RunFolder(Path(run_dir))
        if run.latest_checkpoint() is None:
            raise LoraGuiError(
                f"{run.name} can't be resumed: it has no saved checkpoint (it ended before the first one). "
                "Start a new run instead"
            )
        config = TrainConfig.load(run.config)
        changes = {name: value for name, value in (changes or {}).items() if name in CHANGEABLE_ON_RESUME}
        return self.submit(config.replace(**changes), run.path, resume=True, hub_token=hub_token)

    def stop(self, job_id: int) -> None:
        """Ask a run to stop after its current step (it saves a usable LoRA), or drop it from the queue."""
        job = self._jobs.get(job_id)
        if job is not None:
            job.stop_requested.set()

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self, visitor: Visitor = EVERYONE) -> list[Job]:
        """Every job of `visitor`'s since the app started, oldest first."""
        with self._lock:
            return sorted((job for job in self._jobs.values() if visitor.owns(job.owner)), key=lambda job: job.job_id)

    def active(self) -> Job | None:
        """The job training now, else the next queued one."""
        waiting = [job for job in self.jobs() if not job.done.is_set()]
        running = [job for job in waiting if job.snapshot().status == RUNNING]
        return (running or waiting or [None])[0]

    def latest(self, visitor: Visitor = EVERYONE) -> Job | None:
        """What a freshly opened page shows: `visitor`'s job training now, else their next queued one, else the one
        they submitted last."""
        jobs = self.jobs(visitor)
        waiting = [job for job in jobs if not job.done.is_set()]
        running = [job for job in waiting if job.snapshot().status == RUNNING]
        return (running or waiting or jobs[-1:] or [None])[0]

    def queue_position(self, job_id: int) -> int:
        """1 for the next run to start, 2 for the one after it...; 0 when the job is not waiting."""
        waiting = [job for job in self.jobs() if job.snapshot().status == QUEUED]
        ids = [job.job_id for job in waiting]
        return ids.index(job_id) + 1 if job_id in ids else 0

    def live_status(self, run_path: Path) -> str | None:
        """Queued or running, if a job of this process is working on that run folder."""
        for job in self.jobs():
            if job.run.path == Path(run_path).resolve() and not job.done.is_set():
                return job.snapshot().status
        return None

    def wait(self, job_id: int, timeout: float | None = None) -> JobState:
        job = self._jobs[job_id]
        if not job.done.wait(timeout):
            raise TimeoutError(f"run {job.run.name} did not end within {timeout} s")
        return job.snapshot()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the run training now after its current step (it keeps a checkpoint and a usable LoRA), cancel
        the queued ones, refuse new ones, and end the worker. Whatever has not ended within `timeout` seconds
        is recorded as cancelled or interrupted: the process is about to exit, and its status must not say
        queued or running."""
        with self._lock:
            self._closing = True
        for job in self.jobs():
            job.stop_requested.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout)
        for job in self.jobs():
            if not job.done.is_set():
                log.warning("Run %s did not stop within %.0f s", job.run.name, timeout)
                job.record_unfinished()

    # ---- the worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._run(job)
            finally:
                job.done.set()

    def _run(self, job: Job) -> None:
        hub_token = job.take_hub_token()
        if job.stop_requested.is_set():
            job.set_status(CANCELLED)
            return
        job.set_status(RUNNING)

        def tell(text: str) -> None:
            job.on_event(Event(events.MESSAGE, data={"text": text}))

        try:
            with self.gpu.run_turn(tell, should_stop=job.stop_requested.is_set) as has_the_gpu:
                if not has_the_gpu:  # stopped while it waited: it never began, like a queued run stopped
                    tell("Stopped while waiting for the GPU, before anything was trained")
                    job.set_status(CANCELLED)
                    return
                train(
                    job.config,
                    job.run.path,
                    resume=job.snapshot().resume,
                    on_event=job.on_event,
                    should_stop=job.stop_requested.is_set,
                    hub_token=hub_token,
                    model_policy=self.model_policy,
                )
        except LoraGuiError as error:
            job.set_status(FAILED, str(error))
        except Exception as error:
            # train() turns every error into LoraGuiError; this is a last guard so the worker lives on.
            log.exception("Run %s crashed", job.run.name)
            job.set_status(FAILED, f"unexpected error: {type(error).__name__}: {error}")
        else:
            job.save_status()
