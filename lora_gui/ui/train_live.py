"""The Train tab's live view: the visitor's run as it trains (progress, loss, previews, files, log), polled by the
page's timer, and what the progress says while nothing of theirs has trained."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_gui import runs
from lora_gui.owners import Visitor
from lora_gui.ui import config_form
from lora_gui.ui.common import Ctx, duration, loss_frame, notice, served

if TYPE_CHECKING:
    from lora_gui.jobs import Job, JobState

POLL_SECONDS = 2.0
_WATCHED = ("losses", "samples", "log", "files")


def poll(
    ctx: Ctx, visitor: Visitor, train_job: int | None, train_seen: dict[str, Any], train_notice: str | None = None
) -> dict[str, Any]:
    """The live view of the visitor's run; parts that have not changed since this page's last look are skipped. The
    notice above goes once it is stale: an error of an earlier try while a run trains, and "started" once the run
    has ended (the progress says how)."""
    job = shown_job(ctx, visitor, train_job)
    if job is None:
        return {"progress": progress_html(None, 0), "train_seen": {}} if train_seen else {}
    state = job.snapshot()
    seen = {"job": state.job_id, "status": state.status, **{name: len(getattr(state, name)) for name in _WATCHED}}
    fresh = seen.get("job") != train_seen.get("job")
    changed = {name for name in _WATCHED if fresh or seen[name] != train_seen.get(name)}
    updates: dict[str, Any] = {
        "progress": progress_html(state, ctx.engine.jobs.queue_position(state.job_id)),
        "train_seen": seen,
    }
    if "losses" in changed:
        updates["loss_plot"] = loss_frame(state.losses, state.val_losses if state.validating else None)
        updates["validation"] = _validation_html(job, state)
    if "samples" in changed:
        updates["samples"] = [(served(path), caption) for path, caption in reversed(state.samples)]
    if "log" in changed:
        updates["log"] = "\n".join(reversed(state.log))
    if "files" in changed:
        updates["files"] = gr.update(value=[served(path) for path in state.files] or None, visible=bool(state.files))
    if fresh or state.status != train_seen.get("status"):
        resumable = state.ended and runs.RunFolder(Path(state.run_dir)).latest_checkpoint() is not None
        updates["resume"] = gr.update(visible=resumable and state.status != runs.FINISHED)
        updates["stop"] = gr.update(interactive=not state.ended)
        if state.ended and train_notice:
            updates["train_notice"] = ""
    if train_notice and "lg-error" in train_notice and not state.ended:
        updates["train_notice"] = ""
    return updates


def _validation_html(job: Job, state: JobState) -> str:
    """The validation loss in words: its best step so far, and the file that keeps that step's LoRA."""
    summary = runs.ValidationCurve.of(state.val_losses).summary()
    if summary and job.config.keep_best:
        summary += f" That step's LoRA is kept as {job.run.best_lora.name}."
    return notice(summary) if summary else ""


def shown_job(ctx: Ctx, visitor: Visitor, train_job: int | None) -> Job | None:
    """The run this page started, else the visitor's run training now (or trained last); never another visitor's."""
    job = ctx.engine.jobs.get(train_job) if train_job else None
    return job if job is not None and visitor.owns(job.owner) else ctx.engine.jobs.latest(visitor)


def idle_progress(ctx: Ctx, visitor: Visitor, session: str, train_job: int | None) -> dict[str, Any]:
    """What the progress says while no run of the visitor's is shown, after the pictures changed: what is next."""
    if shown_job(ctx, visitor, train_job) is not None:
        return {}
    staging = ctx.folders.staged(session, visitor)
    return {"progress": progress_html(None, 0, pictures=len(staging.items()) if staging is not None else 0)}


def progress_html(state: JobState | None, queue_position: int, pictures: int = 0) -> str:
    if state is None and pictures:
        return notice(f"Nothing has been trained yet. Your {pictures} pictures are ready: press Start training.")
    if state is None:
        return notice("Nothing has been trained yet. Add pictures in the Dataset tab, then press Start training.")
    name = html.escape(state.run_name)
    if state.status == runs.QUEUED:
        return notice(f"{state.run_name} is queued as number {queue_position}: it starts when the run before it ends.")
    if state.status == runs.CANCELLED:
        return notice(f"{state.run_name} was cancelled before it started.")
    if state.status == runs.INTERRUPTED:  # the app is exiting, and the run did not stop in the time it had
        return notice(state.error, "warning")
    percent = 100 * state.step / state.total_steps if state.total_steps else 0
    if state.status == runs.RUNNING and state.download is not None:
        headline = f"Downloading <b>{html.escape(state.download.repo)}</b>:"
        detail, percent = state.download.summary(), 100 * state.download.fraction
    elif state.status == runs.RUNNING:
        if state.total_steps and state.images_per_second is not None:
            detail = f"{state.images_per_second:.1f} images/s · {duration(state.eta_seconds)}"
        else:
            detail = html.escape(state.message or "Starting") + "…"
        headline = f"Training <b>{name}</b>: step {state.step} of {state.total_steps or '?'}"
    elif state.status == runs.FINISHED:
        early = f" of {state.total_steps}, stopped early as its validation loss stopped improving"
        headline, detail = (
            f"<b>{name}</b> finished: {state.step} steps" + (early if state.step < state.total_steps else ""),
            "Download it below, or try it in Generate.",
        )
    elif state.status == runs.STOPPED:
        headline = f"<b>{name}</b> stopped at step {state.step} of {state.total_steps}"
        detail = "The LoRA so far is below; Resume continues from the last checkpoint."
    else:
        failed = notice(f"Training {state.run_name} failed: {config_form.labelled(state.error)}", "error")
        return failed + f"<p>{_failure_hint(state)}</p>"
    return (
        f'<div class="lg-progress"><div class="lg-progress-text">{headline} <span>{detail}</span></div>'
        f'<div class="lg-bar"><div style="width:{percent:.1f}%"></div></div></div>'
    )


def _failure_hint(state: JobState) -> str:
    if runs.RunFolder(Path(state.run_dir)).latest_checkpoint() is not None:
        return "Its last checkpoint is kept: fix the problem, then press Resume this run."
    return "Nothing was trained yet: fix the problem, then press Start training again (your pictures are kept)."


def wire_live_view(ctx: Ctx) -> None:
    ctx.wire(
        ctx["dataset_version"].change,
        idle_progress,
        ["session", "train_job"],
        ["progress"],
        api_visibility="private",
        show_progress="hidden",
    )
    # The API's outputs keep their places: what came later goes last.
    live = [
        *("progress", "loss_plot", "samples", "log", "files", "resume", "stop", "train_seen", "validation"),
        "train_notice",
    ]
    ctx.wire(
        ctx["timer"].tick,
        poll,
        ["train_job", "train_seen", "train_notice"],
        live,
        api_name="progress",
        show_progress="hidden",
        concurrency_limit=None,
    )
