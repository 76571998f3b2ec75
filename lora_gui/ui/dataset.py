"""The Dataset tab: drop images, fix captions, see what training will make of them.

Everything acts on the session's staging folder on disk (lora_gui.staging); the page only shows it.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
from collections.abc import Iterator
from typing import Any

import gradio as gr

from lora_gui.captioning import captioner_infos
from lora_gui.captioning.folder import CaptionPass, pictures_to_caption
from lora_gui.config import TrainConfig
from lora_gui.data import full_caption
from lora_gui.doctor import Finding, apply_fix, diagnose
from lora_gui.errors import DataError, LoraGuiError
from lora_gui.owners import Visitor
from lora_gui.staging import DatasetReport, StagedImage, Staging
from lora_gui.ui.captioning import TINY_CAPTIONER
from lora_gui.ui.common import Ctx, error_notice, notice, served

DEFAULT_CAPTIONER = "florence2-base"
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
        with gr.Column(visible=ctx.models.allow_paths):
            c["folder"] = gr.Textbox(
                label="…or a folder on this computer",
                placeholder="/home/me/pictures/my-dog",
                info="Its pictures and captions are copied in; the folder itself is never changed.",
            )
            c["add_folder"] = gr.Button("Add pictures from this folder")
    c["dataset_notice"] = gr.HTML()
    c.update(_build_captioning())
    c.update(_build_bulk_edits())
    c["report"] = gr.HTML(_report_html(None), elem_id="dataset-checks")
    with gr.Row(equal_height=True):
        c["check_problems"] = gr.Button(
            "Look for problems (near-copies, blur, small pictures, captions…)", size="sm", elem_id="check-problems"
        )
        c["doctor_notice"] = gr.HTML(elem_id="doctor-notice")
    c["findings"] = gr.State([])
    c["page"] = gr.Slider(1, 2, value=1, step=1, label="Page", visible=False)
    return c


def _build_captioning() -> dict[str, Any]:
    """The captioner, its buttons, and the confirmation before captions are replaced."""
    c: dict[str, Any] = {}
    with gr.Accordion("Caption my pictures", open=True, elem_id="captioning"):
        gr.Markdown(
            "A captioning model writes a caption for each picture; the trigger word below (under *Edit all "
            "captions at once*) goes in front. Captions you typed are kept unless you choose to replace them."
        )
        with gr.Row(equal_height=True):
            c["captioner"] = gr.Dropdown(
                captioner_choices(),
                value=DEFAULT_CAPTIONER,
                label="Captioner",
                info="Florence-2 writes sentences (photos); the WD tagger writes tags (anime, illustration). "
                "It downloads once.",
                scale=2,
                elem_id="captioner",
            )
            c["caption_empty"] = gr.Button("Caption pictures without one", variant="primary", scale=1)
            c["caption_all"] = gr.Button("Caption all (replaces captions)…", scale=1)
            c["caption_stop"] = gr.Button("Stop captioning", variant="stop", scale=0, min_width=140)
        with gr.Row(visible=False) as c["caption_confirm_row"]:
            c["caption_confirm_text"] = gr.HTML()
            c["caption_all_yes"] = gr.Button("Yes, replace them", variant="stop")
            c["caption_all_no"] = gr.Button("No, keep them")
        c["caption_notice"] = gr.HTML(elem_id="caption-notice")
    return c


def _build_bulk_edits() -> dict[str, Any]:
    """Edits of every caption at once: the trigger word, find and replace, a caption for those without."""
    c: dict[str, Any] = {}
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
                    _picture_card(ctx, item)


def _picture_card(ctx: Ctx, item: StagedImage) -> None:
    """One staged picture in the grid: its thumbnail, its caption (saved as it is left), Caption it and Remove."""
    with gr.Column(min_width=180, elem_classes="lg-card"):
        if item.thumbnail:
            gr.Image(served(item.thumbnail), show_label=False, height=170, interactive=False, buttons=[])
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
        with gr.Row():
            recaption = gr.Button("Caption it", size="sm", min_width=80)
            remove = gr.Button("Remove", size="sm", min_width=80)
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
        recaption.click,
        functools.partial(caption_one, relpath=item.relpath),
        ["captioner", "trigger", "session", "resolution", "default_caption", "dataset_version"],
        ["dataset_version", "report", "caption_notice"],
        api_visibility="private",
        concurrency_limit=1,
        concurrency_id="captioning",
    )
    ctx.wire(
        remove.click,
        _remover(item.relpath),
        ["session", "resolution", "default_caption", "dataset_version"],
        ["dataset_version", "report", "page"],
        api_visibility="private",
    )


def build_findings(ctx: Ctx) -> None:
    """What the dataset doctor found, one line each, with its one-click fix where it has one."""

    @gr.render(inputs=[ctx["findings"]], triggers=[ctx["findings"].change])
    def findings(found: list[dict[str, Any]]) -> None:
        for index, finding in enumerate(found or []):
            with gr.Row(equal_height=True, elem_classes="lg-finding"):
                gr.HTML(notice(finding["message"], "warning" if finding["severity"] == "warning" else "info"))
                if finding["fix"]:
                    button = gr.Button(FIX_WORDS.get(finding["fix"], "Fix it"), size="sm", scale=0, min_width=150)
                    ctx.wire(
                        button.click,
                        functools.partial(fix_problem, index=index),
                        ["findings", "base_model", "trigger", *CHECKS],
                        ["findings", "doctor_notice", "dataset_version", "report", "page"],
                        api_visibility="private",
                    )


def wire_dataset_tab(ctx: Ctx) -> None:
    checks = CHECKS
    changed = ["session", "remembered", "dataset_version", "dataset_notice", "report", "page"]
    ctx.wire(ctx["upload"].upload, add_uploads, ["upload", *checks], [*changed, "upload"], api_name="upload")
    ctx.wire(ctx["add_folder"].click, add_folder, ["folder", *checks], changed, api_name="add_folder")
    ctx.wire(ctx["add_trigger"].click, add_trigger, ["trigger", *checks], changed, api_name="add_trigger")
    ctx.wire(ctx["replace"].click, replace, ["find", "replace_with", *checks], changed, api_name="replace")
    ctx.wire(ctx["fill"].click, fill_empty, ["fill_caption", *checks], changed, api_name="fill_empty")
    ctx.wire(ctx["clear"].click, clear, checks, changed, api_visibility="private")
    captioned = ["dataset_version", "report", "caption_notice", "caption_confirm_row"]
    # One captioning model loaded at a time, whoever asks: each takes memory (a GPU's, if it is free).
    one_at_a_time = dict(concurrency_limit=1, concurrency_id="captioning")
    ctx.wire(
        ctx["caption_empty"].click,
        functools.partial(caption_pictures, overwrite=False),
        ["captioner", "trigger", *checks],
        captioned,
        api_name="caption_empty",
        **one_at_a_time,
    )
    ctx.wire(ctx["caption_all"].click, ask_caption_all, ["session"], ["caption_confirm_row", "caption_confirm_text"])
    ctx.wire(
        ctx["caption_all_no"].click,
        lambda ctx: {"caption_confirm_row": gr.update(visible=False)},
        [],
        ["caption_confirm_row"],
    )
    ctx.wire(
        ctx["caption_all_yes"].click,
        functools.partial(caption_pictures, overwrite=True),
        ["captioner", "trigger", *checks],
        captioned,
        api_name="caption_all",
        **one_at_a_time,
    )
    ctx.wire(ctx["caption_stop"].click, stop_captioning, ["session"], ["caption_notice"], api_name="stop_captioning")
    ctx.wire(
        ctx["check_problems"].click,
        check_problems,
        ["base_model", "trigger", *CHECKS],
        ["findings", "doctor_notice"],
        api_name="check_problems",
    )
    for setting in ("resolution", "default_caption"):
        ctx.wire(ctx[setting].change, show_checks, checks[:3], ["report"], api_visibility="private")


# ---- handlers ----------------------------------------------------------------------------------
def add_uploads(ctx: Ctx, visitor: Visitor, upload: list[str] | None, **checks: Any) -> dict[str, Any]:
    changed = _change(ctx, visitor, lambda staging: _adding(staging, staging.add_files, upload or []), **checks)
    return {**changed, "upload": None}


def add_folder(ctx: Ctx, visitor: Visitor, folder: str, **checks: Any) -> dict[str, Any]:
    if not ctx.models.allow_paths:
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
        staging = ctx.folders.staged(session, visitor)
        try:
            if staging is not None:
                staging.set_caption(relpath, caption or "")
        except LoraGuiError as error:
            return {"report": error_notice(error) + checks_html(ctx, visitor, session, resolution, default_caption)}
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
    staging = ctx.folders.staging(session, visitor)
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


# What each of the doctor's one-click fixes is called on its button.
FIX_WORDS = {
    "keep-first": "Keep the first, remove the rest",
    "remove": "Remove them",
    "add-trigger": "Add the trigger word",
    "match-trigger": "Write it the same everywhere",
}
CHECKS = ["session", "resolution", "default_caption", "dataset_version"]


def check_problems(ctx: Ctx, visitor: Visitor, base_model: str, trigger: str, **checks: Any) -> dict[str, Any]:
    """The dataset doctor's findings on the visitor's pictures (for the base model's family, where it is known)."""
    staging = Staging.find(ctx.runs_dir, checks["session"], visitor)
    if staging is None or not staging.items():
        return {"findings": [], "doctor_notice": notice("Add pictures first.", "warning")}
    try:
        found = diagnose(
            staging.folder,
            _resolution(checks["resolution"]),
            ctx.models.family(base_model),
            trigger or "",
            checks["default_caption"] or "",
        )
    except LoraGuiError as error:
        return {"findings": [], "doctor_notice": error_notice(error)}
    summary = f"{len(found)} thing{'s' if len(found) != 1 else ''} to look at:" if found else "No problems found."
    return {"findings": [dataclasses.asdict(finding) for finding in found], "doctor_notice": notice(summary)}


def fix_problem(
    ctx: Ctx, visitor: Visitor, index: int, findings: list[dict[str, Any]], base_model: str, trigger: str, **checks
) -> dict[str, Any]:
    """Apply one finding's fix, then look again."""
    staging = ctx.folders.staged(checks["session"], visitor)
    try:
        if staging is None or not 0 <= index < len(findings or []):
            raise DataError("look for problems again first: the pictures changed")
        values = findings[index]
        done = apply_fix(staging, Finding(**{**values, "files": tuple(values["files"])}), trigger or "")
    except (LoraGuiError, TypeError) as error:
        return {"doctor_notice": error_notice(error if isinstance(error, LoraGuiError) else DataError(str(error)))}
    again = check_problems(ctx, visitor, base_model, trigger, **checks)
    version = (checks["dataset_version"] or 0) + 1
    return {
        **again,
        "doctor_notice": notice(done),
        "dataset_version": version,
        "report": checks_html(ctx, visitor, checks["session"], checks["resolution"], checks["default_caption"]),
        "page": pages_update(staging),
    }


def captioner_choices() -> list[tuple[str, str]]:
    """The captioners by what they write and what they download, then the tiny one that needs no download."""
    return [(f"{info.title} ({info.download_mb:,} MB download)", info.name) for info in captioner_infos()] + [
        (TINY_CAPTIONER, TINY_CAPTIONER)
    ]


def ask_caption_all(ctx: Ctx, visitor: Visitor, session: str) -> dict[str, Any]:
    """Replacing captions is asked first, saying how many the pass would replace."""
    staging = Staging.find(ctx.runs_dir, session, visitor)
    typed = sum(1 for item in staging.items() if item.caption) if staging else 0
    replaced = f"the captions of {typed} picture{'s' if typed != 1 else ''}, yours included" if typed else "no caption"
    text = notice(f"Caption every picture again? This replaces {replaced}.", "warning" if typed else "info")
    return {"caption_confirm_row": gr.update(visible=True), "caption_confirm_text": text}


def caption_pictures(
    ctx: Ctx, visitor: Visitor, captioner: str, trigger: str, overwrite: bool, **checks: Any
) -> Iterator[dict[str, Any]]:
    """Caption the visitor's pictures (those without a caption, or with `overwrite` all), showing each caption
    in the grid as it comes, how far it got, and the captioner's download. A caption typed during the pass is
    kept. Runs on the GPU when no run is training on it, else on the processor, and says which."""
    from lora_gui.downloads import DownloadProgress

    hidden = {"caption_confirm_row": gr.update(visible=False)}
    staging = Staging.find(ctx.runs_dir, checks["session"], visitor)
    if staging is None or not staging.items():
        yield {**hidden, "caption_notice": notice("Add pictures first, then caption them.", "warning")}
        return
    todo = pictures_to_caption(staging.folder, overwrite=overwrite)
    if not todo:
        yield {**hidden, "caption_notice": notice("Every picture has a caption already.")}
        return
    stop = ctx.captioning.stop(staging.session_id)
    version = checks["dataset_version"] or 0
    done = 0
    for event in ctx.captioning.in_background(
        captioner, staging.folder, visitor, overwrite=overwrite, prefix=trigger or "", should_stop=stop.is_set
    ):
        if isinstance(event, DownloadProgress):
            yield {**hidden, "caption_notice": notice(f"Downloading the captioner {event.repo}: {event.summary()}")}
        elif isinstance(event, CaptionPass):
            version += 1
            level = "warning" if event.skipped or event.stopped else "info"
            reasons = "".join(f" {skipped}." for skipped in event.skipped[:_LIST_AT_MOST])
            yield {
                **_shown(ctx, visitor, checks, version),
                "caption_notice": notice(event.summary() + reasons, level),
            }
        elif isinstance(event, LoraGuiError):
            yield {**hidden, "caption_notice": error_notice(event)}
        else:  # a caption written, or a sentence on where the captioner runs
            done += isinstance(event, tuple)
            version += 1
            where = event if isinstance(event, str) else f"Captioned {done} of {len(todo)}…"
            yield {**_shown(ctx, visitor, checks, version), "caption_notice": notice(where)}


def caption_one(
    ctx: Ctx, visitor: Visitor, relpath: str, captioner: str, trigger: str, **checks: Any
) -> dict[str, Any]:
    """Caption one picture again (its caption replaced), with the trigger word in front."""
    staging = ctx.folders.staged(checks["session"], visitor)
    if staging is None:
        return {"caption_notice": notice("Add pictures first, then caption them.", "warning")}
    try:
        caption = ctx.captioning.picture(captioner, staging.folder / relpath, visitor)
        staging.set_caption(relpath, full_caption(caption, trigger or ""))
    except LoraGuiError as error:
        return {"caption_notice": error_notice(error)}
    version = (checks["dataset_version"] or 0) + 1
    return {**_shown(ctx, visitor, checks, version), "caption_notice": notice(f"{relpath}: {caption}")}


def stop_captioning(ctx: Ctx, visitor: Visitor, session: str) -> dict[str, Any]:
    staging = Staging.find(ctx.runs_dir, session, visitor)
    if staging is None:
        return {"caption_notice": notice("Nothing is being captioned.")}
    ctx.captioning.stop(staging.session_id, create=False).set()
    return {"caption_notice": notice("Stopping after the pictures being captioned now; their captions are kept.")}


def _shown(ctx: Ctx, visitor: Visitor, checks: dict[str, Any], version: int) -> dict[str, Any]:
    """The grid redrawn (a new dataset_version) and the checks, after captions changed."""
    return {
        "dataset_version": version,
        "report": checks_html(ctx, visitor, checks["session"], checks["resolution"], checks["default_caption"]),
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
