"""The Dataset tab: drop images, fix captions, see what training will make of them.

Everything acts on the session's staging folder on disk (lora_gui.staging); the page only shows it.
"""

from __future__ import annotations

import html
import math
from typing import Any

import gradio as gr

from lora_gui.config import TrainConfig
from lora_gui.errors import LoraGuiError
from lora_gui.owners import Visitor
from lora_gui.staging import DatasetReport, Staging
from lora_gui.ui.common import Ctx, error_notice, notice, served

PAGE_SIZE = 40
COLUMNS = 4
_LIST_AT_MOST = 8


def build_dataset_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown(
        "**Step 1: your pictures.** Add 10 to 50 pictures of what the LoRA should learn. Each needs a short "
        "caption that describes it; drop a `.txt` file with the same name beside each picture, or type the "
        "captions below. Everything you add is saved on the server, so reloading the page loses nothing."
    )
    with gr.Row():
        c["upload"] = gr.File(
            label="Drop pictures here (.jpg, .png, .webp), their .txt captions, or a .zip of them",
            file_count="multiple",  # no file_types: a wrong file gets our plain note, not a bare refusal
            height=140,
            elem_id="dataset-upload",
        )
        with gr.Column(visible=ctx.allow_paths):
            c["folder"] = gr.Textbox(
                label="…or a folder on this computer",
                placeholder="/home/me/pictures/my-dog",
                info="Its pictures and captions are copied in; the folder itself is never changed.",
            )
            c["add_folder"] = gr.Button("Add pictures from this folder")
    c["dataset_notice"] = gr.HTML()
    with gr.Accordion("Edit all captions at once", open=False):
        with gr.Row():
            c["trigger"] = gr.Textbox(
                label="Trigger word",
                placeholder="sks",
                info="A rare made-up word put in front of every caption; use it in prompts to call up your LoRA.",
            )
            c["add_trigger"] = gr.Button("Put it in front of every caption")
        with gr.Row():
            c["find"] = gr.Textbox(label="Find")
            c["replace_with"] = gr.Textbox(label="Replace with")
            c["replace"] = gr.Button("Replace in every caption")
        with gr.Row():
            c["fill_caption"] = gr.Textbox(label="Caption for pictures that have none", placeholder="a photo of sks")
            c["fill"] = gr.Button("Fill empty captions")
        c["clear"] = gr.Button("Remove all pictures", variant="stop", size="sm")
    c["report"] = gr.HTML(_report_html(None), elem_id="dataset-checks")
    c["page"] = gr.Slider(1, 2, value=1, step=1, label="Page", visible=False)
    return c


def build_dataset_grid(ctx: Ctx) -> None:
    """The thumbnails, each with its caption box; drawn again whenever the staged files change."""

    # Every change to the staged files bumps dataset_version; one trigger (and one render at a time)
    # keeps a change that also sets the session and the page from drawing the grid three times at once.
    # The session is the page's server-side state, which only the handlers set, to a folder its visitor owns.
    @gr.render(
        inputs=[ctx["session"], ctx["dataset_version"], ctx["page"]],
        triggers=[ctx["dataset_version"].change, ctx["page"].input],
        concurrency_limit=1,
    )
    def grid(session: str, version: int, page: float) -> None:
        staging = Staging.find(ctx.runs_dir, session)
        items = staging.items() if staging else []
        if not items:
            return
        first = (int(page or 1) - 1) * PAGE_SIZE
        shown = items[first : first + PAGE_SIZE]
        for start in range(0, len(shown), COLUMNS):
            with gr.Row(equal_height=True):
                for item in shown[start : start + COLUMNS]:
                    with gr.Column(min_width=180, elem_classes="lg-card"):
                        if item.thumbnail:
                            gr.Image(
                                served(item.thumbnail),
                                show_label=False,
                                height=170,
                                interactive=False,
                                buttons=[],
                            )
                        else:
                            gr.HTML(notice(f"{item.relpath} can't be used: {item.problem}", "error"))
                        caption = gr.Textbox(
                            item.caption,
                            label=item.relpath,
                            placeholder="No caption yet: describe the picture",
                            lines=2,
                            interactive=True,
                            elem_classes="lg-caption",
                        )
                        remove = gr.Button("Remove", size="sm")
                    ctx.wire(
                        caption.blur,
                        _caption_saver(item.relpath),
                        ["session", "resolution", "default_caption"],
                        ["report"],
                        extra_inputs={"caption": caption},
                        show_progress="hidden",
                        api_visibility="private",
                    )
                    ctx.wire(
                        remove.click,
                        _remover(item.relpath),
                        ["session", "resolution", "default_caption", "dataset_version"],
                        ["dataset_version", "report", "page"],
                        api_visibility="private",
                    )


def wire_dataset_tab(ctx: Ctx) -> None:
    checks = ["session", "resolution", "default_caption", "dataset_version"]
    changed = ["session", "remembered", "dataset_version", "dataset_notice", "report", "page"]
    ctx.wire(ctx["upload"].upload, add_uploads, ["upload", *checks], [*changed, "upload"], api_name="upload")
    ctx.wire(ctx["add_folder"].click, add_folder, ["folder", *checks], changed, api_name="add_folder")
    ctx.wire(ctx["add_trigger"].click, add_trigger, ["trigger", *checks], changed, api_name="add_trigger")
    ctx.wire(ctx["replace"].click, replace, ["find", "replace_with", *checks], changed, api_name="replace")
    ctx.wire(ctx["fill"].click, fill_empty, ["fill_caption", *checks], changed, api_name="fill_empty")
    ctx.wire(ctx["clear"].click, clear, checks, changed, api_visibility="private")
    for setting in ("resolution", "default_caption"):
        ctx.wire(ctx[setting].change, show_checks, checks[:3], ["report"], api_visibility="private")


# ---- handlers ----------------------------------------------------------------------------------
def add_uploads(ctx: Ctx, visitor: Visitor, upload: list[str] | None, **checks: Any) -> dict[str, Any]:
    changed = _change(ctx, visitor, lambda staging: _adding(staging, staging.add_files, upload or []), **checks)
    return {**changed, "upload": None}


def add_folder(ctx: Ctx, visitor: Visitor, folder: str, **checks: Any) -> dict[str, Any]:
    if not ctx.allow_paths:
        return {"dataset_notice": notice("This Space does not let visitors read server folders; drop files.", "error")}
    if not (folder or "").strip():
        return {"dataset_notice": notice("Type the path of a folder first.", "error")}
    return _change(ctx, visitor, lambda staging: _adding(staging, staging.import_folder, folder.strip()), **checks)


def add_trigger(ctx: Ctx, visitor: Visitor, trigger: str, **checks: Any) -> dict[str, Any]:
    return _change(ctx, visitor, lambda staging: _changed(staging.add_trigger_word(trigger)), **checks)


def replace(ctx: Ctx, visitor: Visitor, find: str, replace_with: str, **checks: Any) -> dict[str, Any]:
    return _change(ctx, visitor, lambda staging: _changed(staging.replace_in_captions(find, replace_with)), **checks)


def fill_empty(ctx: Ctx, visitor: Visitor, fill_caption: str, **checks: Any) -> dict[str, Any]:
    return _change(ctx, visitor, lambda staging: _changed(staging.fill_empty_captions(fill_caption)), **checks)


def clear(ctx: Ctx, visitor: Visitor, **checks: Any) -> dict[str, Any]:
    return _change(ctx, visitor, lambda staging: (staging.clear(), notice("All pictures removed."))[1], **checks)


def show_checks(ctx: Ctx, visitor: Visitor, session: str, resolution: float, default_caption: str) -> dict[str, Any]:
    return {"report": checks_html(ctx, visitor, session, resolution, default_caption)}


def _caption_saver(relpath: str):
    def save(
        ctx: Ctx, visitor: Visitor, session: str, caption: str, resolution: float, default_caption: str
    ) -> dict[str, Any]:
        staging = Staging.find(ctx.runs_dir, session, visitor)
        if staging is not None:
            staging.set_caption(relpath, caption)
        return {"report": checks_html(ctx, visitor, session, resolution, default_caption)}

    return save


def _remover(relpath: str):
    def remove(ctx: Ctx, visitor: Visitor, **checks: Any) -> dict[str, Any]:
        result = _change(ctx, visitor, lambda staging: staging.remove(relpath) or "", **checks)
        return {name: result[name] for name in ("dataset_version", "report", "page")}

    return remove


def _change(
    ctx: Ctx,
    visitor: Visitor,
    action,
    session: str,
    resolution: float,
    default_caption: str,
    dataset_version: int,
):
    """Run an edit on the visitor's staged files (a new folder of theirs if the page has none yet) and return
    everything that shows them."""
    staging = ctx.staging(session, visitor)
    try:
        message = action(staging)
    except LoraGuiError as error:
        message = error_notice(error)
    return {
        "session": staging.session_id,
        "remembered": staging.session_id,
        "dataset_version": (dataset_version or 0) + 1,
        "dataset_notice": message,
        "report": _report_html(staging.check(_resolution(resolution), default_caption or "")),
        "page": pages_update(staging),
    }


def pages_update(staging: Staging) -> dict[str, Any]:
    """The page slider: shown only when the pictures don't fit on one page."""
    pages = max(1, math.ceil(len(staging.items()) / PAGE_SIZE))
    return gr.update(maximum=max(pages, 2), visible=pages > 1, value=1)  # a slider needs max > min


def _adding(staging: Staging, add, source) -> str:
    """Add files and say how many pictures came in, and what was left out and why."""
    before = len(staging.items())
    notes = add(source)
    added = len(staging.items()) - before
    text = f"Added {added} picture{'s' if added != 1 else ''}."
    return notice(" ".join([text, *notes]), "warning" if notes else "info")


def _changed(count: int) -> str:
    return notice(f"{count} caption{'s' if count != 1 else ''} changed.")


def _resolution(value: float | None) -> int:
    return int(value) if value else TrainConfig().resolution


def checks_html(ctx: Ctx, visitor: Visitor, session: str, resolution: float, default_caption: str) -> str:
    staging = Staging.find(ctx.runs_dir, session, visitor)
    if staging is None:
        return _report_html(None)
    return _report_html(staging.check(_resolution(resolution), default_caption or ""))


def _names(names: list[str]) -> str:
    shown = ", ".join(html.escape(name) for name in names[:_LIST_AT_MOST])
    more = len(names) - _LIST_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


def _report_html(report: DatasetReport | None) -> str:
    """The checks in plain words: what will be trained on, and every reason a file won't be."""
    if report is None or not (report.usable or report.uncaptioned or report.unusable):
        empty = "No pictures yet. Drop some above, or press <b>Try the demo</b>."
        return f'<div class="lg-checks"><b>Checks</b><p>{empty}</p></div>'
    lines = []
    if report.usable:
        widths = [example.size[0] for example in report.usable]
        heights = [example.size[1] for example in report.usable]
        sizes = (
            f"{min(widths)}×{min(heights)}"
            if len(set(zip(widths, heights, strict=True))) == 1
            else (f"from {min(widths)}×{min(heights)} to {max(widths)}×{max(heights)}")
        )
        count = len(report.usable)
        lines.append(f"✓ <b>{count} picture{'s' if count != 1 else ''} ready to train</b>, {sizes} pixels.")
    else:
        lines.append("✗ <b>No picture can be used yet</b>: see below.")
    if report.uncaptioned:
        lines.append(
            f"⚠ <b>{len(report.uncaptioned)} without a caption</b> (they are left out until they get one): "
            f"{_names(report.uncaptioned)}. Type a caption under each, or use <i>Fill empty captions</i>."
        )
    for skipped in report.unusable:
        lines.append(f"✗ <b>{html.escape(skipped.name)}</b> can't be used: {html.escape(skipped.reason)}.")
    for group in report.duplicates:
        lines.append(f"⚠ <b>Exact copies</b>: {_names(group)}. Keep one, or that picture counts several times.")
    if report.too_small:
        names = [f"{e.relpath} ({e.size[0]}×{e.size[1]})" for e in report.too_small]
        lines.append(
            f"⚠ <b>{len(names)} smaller than the training resolution ({report.resolution} px)</b>, so they are "
            f"enlarged and may look soft: {_names(names)}."
        )
    items = "".join(f"<li>{line}</li>" for line in lines)
    return f'<div class="lg-checks"><b>Checks</b><ul>{items}</ul></div>'
