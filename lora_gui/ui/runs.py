"""The Runs tab: every run in the runs folder, what it left behind, resume and delete."""

from __future__ import annotations

import shutil
import time
from typing import Any

import gradio as gr
import pandas as pd

from lora_gui import runs
from lora_gui.errors import LoraGuiError
from lora_gui.ui.common import Ctx, error_notice, loss_frame, loss_plot, notice

COLUMNS = ["Name", "Started", "Steps done", "Last loss", "Status"]
_STATUS_WORDS = {runs.RUNNING: "training now", runs.INTERRUPTED: "interrupted (app closed mid-run)"}
# What a person downloads or reads; the checkpoints are the trainer's own.
_FILES = ("*.safetensors", "config.json", "train.log", "metrics.jsonl")


def build_runs_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown(
        "Every run you started, newest first. Pick one to see its loss curve, previews and files. "
        f"They are saved in `{ctx.runs_dir}`."
    )
    c["runs_table"] = gr.Dataframe(
        value=runs_table(ctx), headers=COLUMNS, interactive=False, label="Runs", elem_id="runs-table"
    )
    with gr.Row():
        c["run_pick"] = gr.Dropdown(
            choices=_names(ctx), value=None, label="Open a run", scale=3, allow_custom_value=True
        )
        c["refresh_runs"] = gr.Button("Refresh the list", scale=1)
    with gr.Column(visible=False) as c["run_details"]:
        c["run_info"] = gr.HTML()
        with gr.Row():
            c["run_plot"] = loss_plot("run-loss-plot")
            c["run_samples"] = gr.Gallery(label="Previews", columns=4, height=300, object_fit="contain", preview=False)
        c["run_files"] = gr.File(label="Files (click to download)", file_count="multiple", interactive=False)
        with gr.Row():
            c["run_resume"] = gr.Button("Resume this run", visible=False)
            c["run_delete"] = gr.Button("Delete this run…", variant="stop")
        with gr.Row(visible=False) as c["confirm_row"]:
            c["confirm_text"] = gr.HTML()
            c["confirm_delete"] = gr.Button("Yes, delete it for good", variant="stop")
            c["cancel_delete"] = gr.Button("No, keep it")
    c["runs_notice"] = gr.HTML()
    return c


def wire_runs_tab(ctx: Ctx) -> None:
    listing = ["runs_table", "run_pick"]
    details = [
        "run_details",
        "run_info",
        "run_plot",
        "run_samples",
        "run_files",
        "run_resume",
        "run_delete",
        "confirm_row",
    ]
    ctx.wire(ctx["refresh_runs"].click, refresh, ["run_pick"], listing, api_name="list_runs")
    ctx.wire(ctx["runs_tab"].select, refresh, ["run_pick"], listing, api_visibility="private")
    ctx.wire(ctx["run_pick"].change, open_run, ["run_pick"], [*details, "runs_notice"], api_name="open_run")
    ctx.wire(
        ctx["run_resume"].click, resume_run, ["run_pick"], ["runs_notice", "train_job", "train_seen"], api_name="resume"
    )
    ctx.wire(ctx["run_delete"].click, ask_delete, ["run_pick"], ["confirm_row", "confirm_text"])
    ctx.wire(ctx["cancel_delete"].click, lambda ctx: {"confirm_row": gr.update(visible=False)}, [], ["confirm_row"])
    ctx.wire(
        ctx["confirm_delete"].click,
        delete_run,
        ["run_pick"],
        ["runs_notice", "confirm_row", *listing],
        api_name="delete_run",
    )


def _names(ctx: Ctx) -> list[str]:
    return [summary.name for summary in runs.list_runs(ctx.runs_dir)]


def _status(ctx: Ctx, summary: runs.RunSummary) -> str:
    status = ctx.jobs.live_status(summary.path) or summary.status
    return _STATUS_WORDS.get(status, status)


def runs_table(ctx: Ctx) -> pd.DataFrame:
    rows = [
        [
            summary.name,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.created)),
            f"{summary.steps_done} of {summary.total_steps}" if summary.total_steps else str(summary.steps_done),
            "" if summary.last_loss is None else f"{summary.last_loss:.4f}",
            _status(ctx, summary),
        ]
        for summary in runs.list_runs(ctx.runs_dir)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def refresh(ctx: Ctx, run_pick: str | None) -> dict[str, Any]:
    names = _names(ctx)
    return {
        "runs_table": runs_table(ctx),
        "run_pick": gr.update(choices=names, value=run_pick if run_pick in names else None),
    }


def open_run(ctx: Ctx, run_pick: str | None) -> dict[str, Any]:
    closed = {"confirm_row": gr.update(visible=False)}
    if not run_pick:
        return {"run_details": gr.update(visible=False), **closed}
    try:
        run = ctx.run_folder(run_pick)
    except LoraGuiError as error:
        return {"runs_notice": error_notice(error), "run_details": gr.update(visible=False), **closed}
    summary = runs.summarize(run.path)
    status = _status(ctx, summary)
    live = ctx.jobs.live_status(run.path) is not None
    info = f"{run.name}: {status}, {summary.steps_done} of {summary.total_steps} steps"
    info += f", base model {ctx.base_model_label(summary.base_model) or 'unknown'}."
    info_html = notice(info) + (notice(summary.message, "error") if summary.message else "")
    files = sorted({path for pattern in _FILES for path in run.path.glob(pattern)})
    samples = sorted(run.samples.glob("step-*.png"), key=lambda p: [int(n) for n in p.stem.split("-")[1:]])
    return {
        "run_details": gr.update(visible=True),
        "run_info": info_html,
        "run_plot": loss_frame([(row["step"], row["loss"]) for row in run.read_metrics() if "loss" in row]),
        "run_samples": [(str(path), f"step {path.stem.split('-')[1]}") for path in reversed(samples)],
        "run_files": [str(path) for path in files] or None,
        "run_resume": gr.update(visible=summary.resumable and not live),
        **closed,
    }


def resume_run(ctx: Ctx, run_pick: str | None) -> dict[str, Any]:
    try:
        job = ctx.jobs.resume(ctx.run_folder(run_pick or "").path)
    except LoraGuiError as error:
        return {"runs_notice": error_notice(error)}
    return {
        "runs_notice": notice(f"{run_pick} is resuming; watch it in the Train tab."),
        "train_job": job.job_id,
        "train_seen": {},
    }


def ask_delete(ctx: Ctx, run_pick: str | None) -> dict[str, Any]:
    if not run_pick:
        return {}
    text = notice(f"Delete {run_pick} with its LoRA, previews and pictures? This can't be undone.", "warning")
    return {"confirm_row": gr.update(visible=True), "confirm_text": text}


def delete_run(ctx: Ctx, run_pick: str | None) -> dict[str, Any]:
    try:
        run = ctx.run_folder(run_pick or "")
        if ctx.jobs.live_status(run.path):
            raise LoraGuiError(f"{run.name} is queued or training: stop it first")
        shutil.rmtree(run.path)
    except LoraGuiError as error:
        return {"runs_notice": error_notice(error), "confirm_row": gr.update(visible=False)}
    return {
        "runs_notice": notice(f"Deleted {run_pick}."),
        "confirm_row": gr.update(visible=False),
        **refresh(ctx, None),
    }
