"""The Runs tab: every run in the runs folder, what it left behind, its LoRA for other programs,
resizing it and merging it with others, sharing it on the Hugging Face Hub, resume and delete."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from lora_gui import runs
from lora_gui.errors import LoraGuiError
from lora_gui.owners import Visitor
from lora_gui.ui.common import (
    Ctx,
    build_export,
    error_notice,
    export_lora,
    files_label,
    loss_frame,
    loss_plot,
    notice,
    run_with_lora,
    served,
)
from lora_gui.ui.generate import PIXELS

if TYPE_CHECKING:
    from lora_gui.lora_files.reshape import Reshaped

COLUMNS = ["Name", "Started", "Steps done", "Last loss", "Status"]
_STATUS_WORDS = {runs.RUNNING: "training now", runs.INTERRUPTED: "interrupted (app closed mid-run)"}
# What a person downloads or reads; the checkpoints are the trainer's own.


def build_runs_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown(
        "Every run you started, newest first. Click a row to open that run: its loss curve, previews and files."
        + ("" if ctx.shared else f" They are saved in `{ctx.runs_dir}`.")
    )
    # Filled in when the tab is opened: what a visitor sees depends on who they are.
    c["runs_table"] = gr.Dataframe(
        value=pd.DataFrame([], columns=COLUMNS), headers=COLUMNS, interactive=False, label="Runs", elem_id="runs-table"
    )
    with gr.Row():
        c["run_pick"] = gr.Dropdown(choices=[], value=None, label="Open a run", scale=3, allow_custom_value=True)
        c["refresh_runs"] = gr.Button("Refresh the list", scale=1)
    with gr.Column(visible=False) as c["run_details"]:
        c["run_info"] = gr.HTML(elem_id="run-info")
        c["run_plot"] = loss_plot("run-loss-plot")
        # Full width, three a row: each preview at least 256 px wide, its pixels sharp (app.py's CSS), so the demo
        # model's 64 px previews show what was learned.
        c["run_samples"] = gr.Gallery(
            label="Previews",
            columns=3,
            height=480,  # one row of three in sight (app.py's CSS keeps three columns, so a lone one is not stretched)
            object_fit="contain",
            preview=False,
            elem_classes=[PIXELS],
            elem_id="run-previews",
        )
        c["run_files"] = gr.File(label=files_label("Files"), file_count="multiple", interactive=False)
        # What needs the run's LoRA file: shown only for a run that saved one (open_run).
        with gr.Accordion("Use the LoRA in another program", open=False, elem_id="run-export") as c["run_export_box"]:
            c.update(build_export("run"))
        with gr.Accordion("Resize it, or merge it with other LoRAs", open=False, elem_id="run-tools") as c[
            "run_tools_box"
        ]:
            c.update(_build_tools())
        c.update(_build_push(ctx))
        with gr.Row():
            c["run_resume"] = gr.Button("Resume this run", visible=False)
            c["run_delete"] = gr.Button("Delete this run…", size="sm")  # quiet: the question after it is the loud one
        with gr.Row(visible=False) as c["confirm_row"]:
            c["confirm_text"] = gr.HTML()
            c["confirm_delete"] = gr.Button("Yes, delete it for good", variant="stop")
            c["cancel_delete"] = gr.Button("No, keep it")
    c["runs_notice"] = gr.HTML()
    return c


def _build_push(ctx: Ctx) -> dict[str, Any]:
    """Sharing the run on the Hub: its page's name, a token where the visitor has none from signing in, privacy."""
    c: dict[str, Any] = {}
    with gr.Accordion("Share it on the Hugging Face Hub", open=False, elem_id="run-push") as c["run_push_box"]:
        gr.Markdown(
            "Uploads both LoRA files, a description page (model card) and the preview images to a model "
            "page on huggingface.co. Your training pictures and checkpoints are never uploaded."
        )
        with gr.Row(equal_height=True):
            c["hub_repo"] = gr.Textbox(
                label="Name on the Hub",
                info="NAME, or YOUR-USERNAME/NAME; it is created if it does not exist yet.",
            )
            c["hub_token"] = gr.Textbox(
                label="Hugging Face token",
                type="password",
                info="A token with write access, from huggingface.co/settings/tokens. It is used for this "
                "upload only and never saved."
                + ("" if ctx.on_space else " Leave it empty if this computer is already signed in to Hugging Face."),
            )
            c["hub_private"] = gr.Checkbox(
                True, label="Private", info="Only you can see it; untick to share it with everyone."
            )
        c["hub_push"] = gr.Button("Push to Hub", elem_id="push-button")
        c["hub_notice"] = gr.HTML()
    return c


def _build_tools() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown(
        "A lower rank makes a smaller file that keeps the most of the LoRA it can (the share kept is shown). "
        "Merging makes one LoRA that does what several do together, each at its strength. Both files are written "
        "in the run folder: kohya's layout (A1111, Forge, ComfyUI) and diffusers' (`.diffusers.safetensors`)."
    )
    with gr.Row(equal_height=True):
        c["tools_rank"] = gr.Number(4, precision=0, minimum=1, label="New rank")
        c["tools_resize"] = gr.Button("Resize", elem_id="resize-button")
    with gr.Row(equal_height=True):
        c["tools_others"] = gr.Dropdown(choices=[], value=[], multiselect=True, label="Merge with your runs")
        c["tools_upload"] = gr.File(label="…or a LoRA file", file_types=[".safetensors"], type="filepath")
    with gr.Row(equal_height=True):
        c["tools_strength"] = gr.Number(1.0, label="This run's strength")
        c["tools_other_strength"] = gr.Number(1.0, label="The others' strength")
        c["tools_merge_rank"] = gr.Number(
            0, precision=0, minimum=0, label="Rank of the result", info="0: exact (the ranks add up)"
        )
        c["tools_merge"] = gr.Button("Merge", elem_id="merge-button")
    c["tools_notice"] = gr.HTML()
    c["tools_files"] = gr.File(
        label=files_label("New LoRA", "the .diffusers.safetensors one"), file_count="multiple", interactive=False
    )
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
        "run_file",
        "hub_repo",
        "hub_token",
        "tools_others",
        "tools_files",
        "run_export_box",
        "run_tools_box",
        "run_push_box",
    ]
    ctx.wire(ctx["refresh_runs"].click, refresh, ["run_pick"], listing, api_name="list_runs")
    ctx.wire(ctx["runs_tab"].select, refresh, ["run_pick"], listing, api_visibility="private")
    ctx.wire(ctx["run_pick"].change, open_run, ["run_pick"], [*details, *ABOUT_A_RUN], api_name="open_run")
    # A click anywhere in a row opens that run. Not through ctx.wire, which hands handlers no event data: the name
    # picked is checked against the visitor's runs by open_run, as a name typed in the menu is.
    ctx["runs_table"].select(open_row, None, ctx["run_pick"], api_visibility="private")
    ctx.wire(
        ctx["run_resume"].click,
        resume_run,
        ["run_pick", "hf_token"],  # the Train tab's token, for a gated base model's download
        ["runs_notice", "train_job", "train_seen", "tabs"],
        api_name="resume",
    )
    ctx.wire(
        ctx["run_export"].click,
        export,
        ["run_pick", "run_layout"],
        ["run_export_notice", "run_file"],
        api_name="export",
    )
    _wire_lora_tools(ctx)
    ctx.wire(ctx["run_delete"].click, ask_delete, ["run_pick"], ["confirm_row", "confirm_text"])
    ctx.wire(ctx["cancel_delete"].click, lambda ctx: {"confirm_row": gr.update(visible=False)}, [], ["confirm_row"])
    ctx.wire(
        ctx["confirm_delete"].click,
        delete_run,
        ["run_pick"],
        ["runs_notice", "confirm_row", *listing],
        api_name="delete_run",
    )


def _wire_lora_tools(ctx: Ctx) -> None:
    """Resizing and merging the run's LoRA, and pushing it to the Hub."""
    ctx.wire(ctx["tools_resize"].click, resize, ["run_pick", "tools_rank"], _TOOLS_OUT, api_name="resize")
    ctx.wire(
        ctx["tools_merge"].click,
        merge,
        ["run_pick", "tools_others", "tools_upload", "tools_strength", "tools_other_strength", "tools_merge_rank"],
        _TOOLS_OUT,
        api_name="merge",
    )
    ctx.wire(
        ctx["hub_push"].click,
        push,
        ["run_pick", "hub_repo", "hub_token", "hub_private"],
        ["hub_notice"],
        api_name="push_to_hub",
    )


def _status(ctx: Ctx, summary: runs.RunSummary) -> str:
    status = ctx.engine.jobs.live_status(summary.path) or summary.status
    return _STATUS_WORDS.get(status, status)


def runs_table(ctx: Ctx, summaries: list[runs.RunSummary]) -> pd.DataFrame:
    rows = [
        [
            summary.name,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.created)),
            f"{summary.steps_done} of {summary.total_steps}" if summary.total_steps else str(summary.steps_done),
            "" if summary.last_loss is None else f"{summary.last_loss:.4f}",
            _status(ctx, summary),
        ]
        for summary in summaries
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def refresh(ctx: Ctx, visitor: Visitor, run_pick: str | None) -> dict[str, Any]:
    summaries = ctx.folders.runs_of(visitor)
    names = [summary.name for summary in summaries]
    return {
        "runs_table": runs_table(ctx, summaries),
        "run_pick": gr.update(choices=names, value=run_pick if run_pick in names else None),
    }


def open_row(selected: gr.SelectData) -> Any:
    """The run of the row clicked in the runs table (its first column is the name), for the menu that opens it."""
    row = selected.row_value or []
    return row[0] if row and row[0] else gr.skip()


# The messages about a run: each goes when another run is opened, since it was about the one before.
ABOUT_A_RUN = ["runs_notice", "hub_notice", "tools_notice", "run_export_notice"]


def open_run(ctx: Ctx, visitor: Visitor, run_pick: str | None) -> dict[str, Any]:
    closed = {"confirm_row": gr.update(visible=False)}
    if not run_pick:  # a run deleted: its "Deleted" message stays
        return {"run_details": gr.update(visible=False), **closed}
    try:
        run = ctx.folders.run(run_pick, visitor)
    except LoraGuiError as error:
        return {"runs_notice": error_notice(error), "run_details": gr.update(visible=False), **closed}
    summary = runs.summarize(run.path)
    live = ctx.engine.jobs.live_status(run.path) is not None
    metrics = run.read_metrics()
    losses = [(row["step"], row["loss"]) for row in metrics if "loss" in row]
    validation = runs.ValidationCurve.from_metrics(metrics)
    return {
        **dict.fromkeys(ABOUT_A_RUN, ""),
        "run_details": gr.update(visible=True),
        "run_info": run_info(ctx, run, summary, validation, live),
        "run_plot": loss_frame(losses, validation.points or None),
        "run_samples": [(served(path), f"step {step}") for step, _, path in reversed(run.sample_images())],
        "run_files": [served(path) for path in run.downloadable_files()] or None,
        "run_resume": gr.update(visible=summary.resumable and not live),
        "run_file": gr.update(value=None, visible=False),
        "hub_repo": run.name,
        "tools_others": gr.update(
            choices=[other.name for other in ctx.folders.runs_of(visitor) if other.has_lora and other.name != run.name]
        ),
        "tools_files": None,
        **_lora_actions(visitor, summary.has_lora),
        **closed,
    }


def run_info(
    ctx: Ctx, run: runs.RunFolder, summary: runs.RunSummary, validation: runs.ValidationCurve, live: bool
) -> str:
    """What happened to the run, in the order it happened (started, then how it ended), its base model, why it
    ended where it failed or was cut short, and its best step where validation measured one."""
    status = _status(ctx, summary)
    ended = f" {_when(summary.ended)}" if summary.ended else ""
    steps = f"step {summary.steps_done} of {summary.total_steps}"
    history = f"{status}: {steps}" if live else f"then {status}{ended} at {steps}"
    info = f"{run.name}: started {_when(summary.created)}, {history}."
    info += f" Base model: {ctx.models.label(summary.base_model) or 'unknown'}."
    if not summary.has_lora and not live:
        info += " It saved no LoRA file, so there is nothing to download or share."
    level = "error" if summary.status == runs.FAILED else "warning"  # an interrupted run's message says how to go on
    html = notice(info) + (notice(summary.message, level) if summary.message else "")
    if validation.best is not None:
        kept = f" That step's LoRA is {run.best_lora.name}." if run.best_lora.is_file() else ""
        html += notice(validation.summary() + kept)
    return html


def _when(moment: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment)) if moment else ""


def _lora_actions(visitor: Visitor, has_lora: bool) -> dict[str, Any]:
    """What needs the run's LoRA file, shown only for a run that saved one: getting it for another program, resizing
    or merging it, and sharing it on the Hub, which needs the Hub within reach (not offline) and a token box only
    for a visitor not signed in with Hugging Face."""
    from huggingface_hub import constants

    return {
        "run_export_box": gr.update(visible=has_lora),
        "run_tools_box": gr.update(visible=has_lora),
        "run_push_box": gr.update(visible=has_lora and not constants.HF_HUB_OFFLINE),
        "hub_token": gr.update(visible=not visitor.hub_token),
    }


def export(ctx: Ctx, visitor: Visitor, run_pick: str | None, run_layout: str) -> dict[str, Any]:
    return export_lora(ctx, visitor, "run", run_pick, run_layout)


_TOOLS_OUT = ["tools_notice", "tools_files"]


def resize(ctx: Ctx, visitor: Visitor, run_pick: str | None, tools_rank: float | None) -> dict[str, Any]:
    """The run's LoRA at a lower rank, written in <run>/tools/ and offered for download."""
    from lora_gui.lora_files import reshape

    rank = int(tools_rank or 0)
    try:
        run = run_with_lora(ctx, visitor, run_pick or "")
        result = reshape.resize_lora(run.path, rank, run.path / reshape.TOOLS / f"{run.name}-rank{rank}.safetensors")
    except LoraGuiError as error:
        return {"tools_notice": error_notice(error), "tools_files": None}
    return _made(result)


def merge(
    ctx: Ctx,
    visitor: Visitor,
    run_pick: str | None,
    tools_others: list[str] | None,
    tools_upload: str | None,
    tools_strength: float | None,
    tools_other_strength: float | None,
    tools_merge_rank: float | None,
) -> dict[str, Any]:
    """The run's LoRA merged with the visitor's other runs' and an uploaded file, written in <run>/tools/."""
    from lora_gui.lora_files import reshape

    rank = int(tools_merge_rank or 0) or None
    try:
        run = run_with_lora(ctx, visitor, run_pick or "")
        others: list[Path] = [run_with_lora(ctx, visitor, name).path for name in tools_others or []]
        others += [Path(tools_upload)] if tools_upload else []
        if not others:
            raise LoraGuiError("pick another of your runs or upload a LoRA file to merge with first")
        strength, other_strength = float(tools_strength or 0), float(tools_other_strength or 0)
        sources = [(run.path, strength), *((other, other_strength) for other in others)]
        name = f"{run.name}-merged" + (f"-rank{rank}" if rank else "")
        result = reshape.merge_loras(sources, run.path / reshape.TOOLS / f"{name}.safetensors", rank)
    except LoraGuiError as error:
        return {"tools_notice": error_notice(error), "tools_files": None}
    return _made(result)


def _made(result: Reshaped) -> dict[str, Any]:
    message = f"{result.files[0].name}: {result.note}. Both layouts are below."
    return {"tools_notice": notice(message), "tools_files": [served(path) for path in result.files]}


def push(
    ctx: Ctx, visitor: Visitor, run_pick: str | None, hub_repo: str, hub_token: str, hub_private: bool
) -> dict[str, Any]:
    """Upload the run, with the token typed or the one the visitor's Hugging Face sign-in gave. The token stays in
    this call: it is handed to huggingface_hub and nowhere else."""
    from lora_gui import hub

    token = ctx.models.hub_token(hub_token, visitor) or None
    if token is None and ctx.on_space:
        # Without a token the upload would go out under the Space owner's own login.
        how = "Sign in with Hugging Face at the top of the page, or paste" if ctx.sign_in else "Paste"
        message = f"{how} a Hugging Face token with write access first (make one at huggingface.co/settings/tokens)."
        return {"hub_notice": notice(message, "warning")}
    if not (hub_repo or "").strip():
        return {"hub_notice": notice("Type a name for the model page on the Hub first.", "warning")}
    try:
        run = run_with_lora(ctx, visitor, run_pick or "")
        url = hub.push_to_hub(run.path, hub_repo, token=token, private=bool(hub_private))
    except LoraGuiError as error:
        return {"hub_notice": error_notice(error)}
    seen_by = "only you" if hub_private else "everyone"
    return {"hub_notice": notice(f"Uploaded; {seen_by} can see it at", link=url)}


def resume_run(ctx: Ctx, visitor: Visitor, run_pick: str | None, hf_token: str | None = None) -> dict[str, Any]:
    try:
        run = ctx.folders.run(run_pick or "", visitor)
        ctx.folders.check_room_for_a_run(visitor)
        job = ctx.engine.jobs.resume(run.path, hub_token=ctx.models.hub_token(hf_token, visitor))
    except LoraGuiError as error:
        return {"runs_notice": error_notice(error)}
    return {
        "runs_notice": notice(f"{run_pick} is resuming in the Train tab, where it shows as it trains."),
        "train_job": job.job_id,
        "train_seen": {},
        "tabs": gr.Tabs(selected="train"),
    }


def ask_delete(ctx: Ctx, run_pick: str | None) -> dict[str, Any]:
    if not run_pick:  # the run's owner is checked when the deletion is confirmed
        return {}
    text = notice(f"Delete {run_pick} with its LoRA, previews and pictures? This can't be undone.", "warning")
    return {"confirm_row": gr.update(visible=True), "confirm_text": text}


def delete_run(ctx: Ctx, visitor: Visitor, run_pick: str | None) -> dict[str, Any]:
    try:
        run = ctx.folders.run(run_pick or "", visitor)
        if ctx.engine.jobs.live_status(run.path):
            raise LoraGuiError(f"{run.name} is queued or training: stop it first")
        runs.delete_run(run.path)
    except LoraGuiError as error:
        return {"runs_notice": error_notice(error), "confirm_row": gr.update(visible=False)}
    return {
        "runs_notice": notice(f"Deleted {run_pick}."),
        "confirm_row": gr.update(visible=False),
        **refresh(ctx, visitor, None),
    }
