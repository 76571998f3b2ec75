"""The Dataset tab: drop images, fix captions, see what training will make of them.

Everything acts on the session's staging folder on disk (lora_gui.staging); the page only shows it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import gradio as gr

from lora_gui.data import read_header
from lora_gui.doctor import Finding, apply_fix, diagnose
from lora_gui.errors import DataError, LoraGuiError
from lora_gui.owners import Visitor
from lora_gui.staging import StagedImage, Staging
from lora_gui.ui.common import Ctx, error_notice, notice, served
from lora_gui.ui.dataset_captions import build_captioning, caption_one, undo_caption, wire_captioning
from lora_gui.ui.dataset_report import (
    CHECKS,
    PAGE_SIZE,
    checks_html,
    pages_update,
    report_html,
    resolution_of,
)

COLUMNS = 4
CARD_WIDTH = 180
PICTURE_HEIGHT = 200  # pixels of a picture's box on its card


def build_dataset_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown(
        "**Step 1: your pictures.** Add 10 to 50 pictures of what the LoRA should learn. Each needs a short "
        "caption that describes it; drop a `.txt` file with the same name beside each picture, or type the "
        "captions below. Everything you add is saved on the server, so reloading the page loses nothing."
    )
    # Shown while the demo's pictures are: they live in a folder of their own, the visitor's own kept beside it.
    with gr.Row(visible=False, equal_height=True, elem_classes="lg-demo-shown") as c["demo_row"]:
        c["demo_text"] = gr.HTML()
        c["back_to_mine"] = gr.Button("Back to my pictures", scale=0, min_width=280, elem_id="back-to-mine")
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
    c.update(_build_before_pictures())
    c["dataset_notice"] = gr.HTML()
    c.update(build_captioning())
    c.update(_build_bulk_edits())
    c["report"] = gr.HTML(report_html(None), elem_id="dataset-checks")
    with gr.Row(equal_height=True):
        c["check_problems"] = gr.Button(
            "Look for problems (near-copies, blur, small pictures, captions…)", size="sm", elem_id="check-problems"
        )
        c["doctor_notice"] = gr.HTML(elem_id="doctor-notice")
    c["findings"] = gr.State([])
    c["card_note"] = gr.State({})  # what Caption it did, drawn on that picture's card (dataset_captions.card_note)
    c["page"] = gr.Slider(1, 2, value=1, step=1, label="Page", visible=False)
    return c


def _build_before_pictures() -> dict[str, Any]:
    """The second half of edit pairs, folded away: a LoRA of a subject or style needs none."""
    c: dict[str, Any] = {}
    with gr.Accordion("Before pictures (edit LoRAs only)", open=False, elem_id="before-pictures"):
        gr.Markdown(
            "Only for an **edit LoRA**, which teaches an editing model (such as Flux.1 Kontext) a change: the pictures "
            "above are then each picture *after* the edit, and here goes each one *before* it, under the same name "
            "(any picture format). The caption says the edit, such as *make it a watercolour*. A .zip with folders "
            "`before/` and `after/` can go straight in the drop area above."
        )
        c["before_upload"] = gr.File(
            label="Drop the before pictures here, each named as its after picture, or a .zip of them",
            file_count="multiple",
            height=110,
            elem_id="before-upload",
        )
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
    return c


def _build_remove_all() -> dict[str, Any]:
    """Remove all pictures, above them, and the question it asks first."""
    c: dict[str, Any] = {}
    with gr.Row(visible=False) as c["clear_row"]:
        c["clear"] = gr.Button("Remove all pictures…", size="sm", scale=0, min_width=220, elem_id="remove-all")
    with gr.Row(visible=False, equal_height=True) as c["clear_confirm_row"]:
        c["clear_confirm_text"] = gr.HTML()
        c["clear_yes"] = gr.Button("Yes, remove them", variant="stop", scale=0, min_width=200)
        c["clear_no"] = gr.Button("No, keep them", scale=0, min_width=200)
    return c


def build_dataset_grid(ctx: Ctx) -> None:
    """Remove all, then the thumbnails, each with its caption box; drawn again whenever the staged files change."""
    ctx.add(_build_remove_all())

    # Every change to the staged files bumps dataset_version; one trigger (and one render at a time)
    # keeps a change that also sets the session and the page from drawing the grid three times at once.
    # The session is the page's server-side state, which only the handlers set, to a folder its visitor owns.
    @gr.render(
        inputs=[ctx["session"], ctx["dataset_version"], ctx["page"], ctx["card_note"]],
        triggers=[ctx["dataset_version"].change, ctx["page"].input],
        concurrency_limit=1,
    )
    def grid(session: str, version: int, page: float, note: dict[str, Any]) -> None:
        staging = Staging.find(ctx.runs_dir, session)
        items = staging.items() if staging else []
        if not items:
            return
        first = (int(page or 1) - 1) * PAGE_SIZE
        shown = items[first : first + PAGE_SIZE]
        note = note if (note or {}).get("version") == version else {}  # a card's message lasts until the next change
        # Edit pairs: each card shows its before picture too, or that it has none.
        befores = staging.before_thumbnails([item.relpath for item in shown]) if staging.before_pictures() else None
        for row in grid_rows(shown):
            with gr.Row(equal_height=True):
                for item in row:
                    if item is None:
                        gr.Column(min_width=CARD_WIDTH, elem_classes="lg-card-space")
                    else:
                        _picture_card(ctx, item, note if note.get("relpath") == item.relpath else {}, befores)


def grid_rows(items: list[StagedImage]) -> list[list[StagedImage | None]]:
    """The pictures in rows of COLUMNS, the last one filled with empty places (None): a row of fewer cards
    stretches them to its width."""
    starts = range(0, len(items), COLUMNS)
    rows: list[list[StagedImage | None]] = [list(items[start : start + COLUMNS]) for start in starts]
    if rows:
        rows[-1] += [None] * (COLUMNS - len(rows[-1]))
    return rows


def picture_classes(item: StagedImage) -> list[str]:
    """A picture smaller than its box is drawn to fill it with its pixels kept sharp (CSS in app.py): the demo's
    pictures are 128 px, which a browser would draw small or smooth into a blur."""
    return ["lg-pixelated"] if max(read_header(item.path).size) < PICTURE_HEIGHT else []


def _picture_card(ctx: Ctx, item: StagedImage, note: dict[str, Any], befores: dict[str, Any] | None = None) -> None:
    """One staged picture in the grid: its thumbnail (with its before picture's, for edit pairs: `befores`), its
    caption (saved as it is left), Caption it and Remove, and what Caption it did (with Undo where it replaced a
    caption)."""
    with gr.Column(min_width=CARD_WIDTH, elem_classes="lg-card"):
        if befores is not None:
            _before_picture(item, befores)
        if item.thumbnail:
            gr.Image(
                served(item.thumbnail),
                label="After",
                show_label=befores is not None,
                height=PICTURE_HEIGHT,
                interactive=False,
                buttons=[],
                elem_classes=picture_classes(item),
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
        with gr.Row():
            recaption = gr.Button("Caption it", size="sm", min_width=80)
            remove = gr.Button("Remove", size="sm", min_width=80)
        if note:
            gr.HTML(note["html"], elem_classes="lg-card-note")
        if note.get("previous"):
            undo = gr.Button("Undo", size="sm", elem_classes="lg-card-undo")
            undone = functools.partial(undo_caption, relpath=item.relpath, previous=note["previous"])
            ctx.wire(undo.click, undone, CHECKS, ["dataset_version", "report", "card_note"], api_visibility="private")
    ctx.wire(
        caption.blur,
        _caption_saver(item.relpath),
        ["session", "resolution", "default_caption"],
        ["report"],
        extra_inputs={"caption": caption},
        show_progress="hidden",
        api_visibility="private",
        engine_free=True,
    )
    ctx.wire(
        recaption.click,
        functools.partial(caption_one, relpath=item.relpath),
        ["captioner", "trigger", *CHECKS],
        ["dataset_version", "report", "caption_notice", "card_note"],
        api_visibility="private",
        concurrency_limit=1,
        concurrency_id="captioning",
    )
    removed = ["dataset_version", "report", "page"]
    ctx.wire(remove.click, _remover(item.relpath), CHECKS, removed, api_visibility="private", engine_free=True)


def _before_picture(item: StagedImage, befores: dict[str, Any]) -> None:
    """A pair's before picture above its after picture on the card, small, or why the pair won't train."""
    if item.relpath not in befores:
        gr.HTML(notice("No before picture of this name: left out of training.", "warning"))
    elif befores[item.relpath] is None:
        gr.HTML(notice("Its before picture can't be used: see Checks.", "error"))
    else:
        small = max(read_header(befores[item.relpath]).size) < PICTURE_HEIGHT  # drawn large and sharp, as the after
        gr.Image(
            served(befores[item.relpath]),
            label="Before",
            height=PICTURE_HEIGHT // 2,
            interactive=False,
            buttons=[],
            elem_classes=["lg-before", *(["lg-pixelated"] if small else [])],
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
    # Pictures and captions on disk: a newcomer's first drop is answered while the engine still loads.
    wire = functools.partial(ctx.wire, engine_free=True)
    wire(ctx["upload"].upload, add_uploads, ["upload", *checks], [*changed, "upload"], api_name="upload")
    before = ["before_upload", *checks]
    wire(ctx["before_upload"].upload, add_before, before, [*changed, "before_upload"], api_name="upload_before")
    wire(ctx["add_folder"].click, add_folder, ["folder", *checks], changed, api_name="add_folder")
    wire(ctx["add_trigger"].click, add_trigger, ["trigger", *checks], changed, api_name="add_trigger")
    wire(ctx["replace"].click, replace, ["find", "replace_with", *checks], changed, api_name="replace")
    wire(ctx["fill"].click, fill_empty, ["fill_caption", *checks], changed, api_name="fill_empty")
    wire(ctx["back_to_mine"].click, back_to_mine, checks, changed, api_name="back_to_my_pictures")
    wire(ctx["clear"].click, ask_clear, ["session"], ["clear_confirm_row", "clear_confirm_text"])
    hide = ["clear_confirm_row"]
    wire(ctx["clear_no"].click, lambda ctx: {"clear_confirm_row": gr.update(visible=False)}, [], hide)
    wire(ctx["clear_yes"].click, clear, checks, [*changed, "clear_confirm_row"], api_visibility="private")
    wire(
        ctx["dataset_version"].change,
        show_set,
        ["session"],
        ["demo_row", "demo_text", "back_to_mine", "clear_row", "clear", "clear_confirm_row", "try_demo"],
        api_visibility="private",
        show_progress="hidden",
    )
    wire_captioning(ctx)
    ctx.wire(
        ctx["check_problems"].click,
        check_problems,
        ["base_model", "trigger", *CHECKS],
        ["findings", "doctor_notice"],
        api_name="check_problems",
    )
    for setting in ("resolution", "default_caption"):
        wire(ctx[setting].change, show_checks, checks[:3], ["report"], api_visibility="private")


# ---- handlers ----------------------------------------------------------------------------------
def add_uploads(ctx: Ctx, visitor: Visitor, upload: list[str] | None, session: str, **checks: Any) -> dict[str, Any]:
    session, put_away = _own_set(ctx, visitor, session)
    adding = functools.partial(_adding, add=lambda staging: staging.add_files(upload or []), note=put_away)
    return {**_change(ctx, visitor, adding, session=session, **checks), "upload": None}


def add_before(
    ctx: Ctx, visitor: Visitor, before_upload: list[str] | None, session: str, **checks: Any
) -> dict[str, Any]:
    """An edit's before pictures, beside the visitor's pictures (their own, as `add_uploads` puts them)."""
    session, put_away = _own_set(ctx, visitor, session)
    adding = functools.partial(_adding, add=lambda staging: staging.add_files(before_upload or [], True), note=put_away)
    return {**_change(ctx, visitor, adding, session=session, **checks), "before_upload": None}


def add_folder(ctx: Ctx, visitor: Visitor, folder: str, **checks: Any) -> dict[str, Any]:
    if not ctx.models.allow_paths:
        return {"dataset_notice": notice("This Space does not let visitors read server folders; drop files.", "error")}
    if not (folder or "").strip():
        return {"dataset_notice": notice("Type the path of a folder first.", "error")}
    session, put_away = _own_set(ctx, visitor, checks.pop("session"))
    adding = functools.partial(_adding, add=lambda staging: staging.import_folder(folder.strip()), note=put_away)
    return _change(ctx, visitor, adding, session=session, **checks)


def add_trigger(ctx: Ctx, visitor: Visitor, trigger: str, **checks: Any) -> dict[str, Any]:
    return _change(ctx, visitor, lambda staging: _changed(staging.add_trigger_word(trigger)), **checks)


def replace(ctx: Ctx, visitor: Visitor, find: str, replace_with: str, **checks: Any) -> dict[str, Any]:
    return _change(ctx, visitor, lambda staging: _changed(staging.replace_in_captions(find, replace_with)), **checks)


def fill_empty(ctx: Ctx, visitor: Visitor, fill_caption: str, **checks: Any) -> dict[str, Any]:
    return _change(ctx, visitor, lambda staging: _changed(staging.fill_empty_captions(fill_caption)), **checks)


def clear(ctx: Ctx, visitor: Visitor, **checks: Any) -> dict[str, Any]:
    removed = _change(ctx, visitor, lambda staging: (staging.clear(), notice("All pictures removed."))[1], **checks)
    return {**removed, "clear_confirm_row": gr.update(visible=False)}


def ask_clear(ctx: Ctx, visitor: Visitor, session: str) -> dict[str, Any]:
    """Removing every picture is asked first, saying how many, and whether they can come back."""
    shown = ctx.folders.staged(session, visitor)
    count = len(shown.items()) if shown is not None else 0
    if not count:
        return {"clear_confirm_row": gr.update(visible=False)}
    if shown.is_demo:
        question = f"Remove the demo's {_pictures(count)}? Try the demo draws them again."
    else:
        question = f"Remove all {_pictures(count)} and their captions? This can't be undone."
    return {"clear_confirm_row": gr.update(visible=True), "clear_confirm_text": notice(question, "warning")}


def back_to_mine(ctx: Ctx, visitor: Visitor, session: str, **checks: Any) -> dict[str, Any]:
    """From the demo's pictures back to the visitor's own, which the demo set aside; the demo's are put away."""
    shown, own = ctx.folders.staged(session, visitor), ctx.folders.own(session, visitor)
    if shown is None or not shown.is_demo or own is None:
        return {"dataset_notice": notice("These are your own pictures already.")}
    shown.delete()
    back = (
        f"Back to your {_pictures(len(own.items()))}. The Train tab still has the demo's model and settings: "
        "choose yours there before you train. Try the demo draws the demo's pictures again."
    )
    return _change(ctx, visitor, lambda staging: notice(back), session=own.session_id, **checks)


def show_set(ctx: Ctx, visitor: Visitor, session: str) -> dict[str, Any]:
    """Whose pictures are shown (the demo's, with the way back to the visitor's own), and Remove all for as many
    as there are; a question asked before goes, as the pictures changed."""
    shown = ctx.folders.staged(session, visitor)
    count = len(shown.items()) if shown is not None else 0
    demo = shown is not None and shown.is_demo
    own = ctx.folders.own(session, visitor) if demo else None
    mine = len(own.items()) if own is not None else 0
    if mine:
        text = f"These are the demo's pictures. Your own {_pictures(mine)} are kept, and pictures you add go to them."
    else:
        text = "These are the demo's pictures. Pictures you add start a set of your own (the demo's are put away)."
    return {
        "demo_row": gr.update(visible=demo),
        "demo_text": notice(text),
        "back_to_mine": gr.update(value=f"Back to my pictures ({mine})", visible=mine > 0),
        "clear_row": gr.update(visible=count > 0),
        "clear": gr.update(value="Remove the demo's pictures…" if demo else "Remove all pictures…"),
        "clear_confirm_row": gr.update(visible=False),
        # Loud on an empty page, quiet once there are pictures (the next step's button is Start training).
        "try_demo": gr.update(variant="secondary" if count else "primary"),
    }


def _own_set(ctx: Ctx, visitor: Visitor, session: str) -> tuple[str, str]:
    """Where pictures the visitor adds go: the folder shown, or, while it is the demo's, their own (set aside by the
    demo; a new one if none), never mixed with the demo's, which are put away. And the sentence that says so."""
    shown = ctx.folders.staged(session, visitor)
    if shown is None or not shown.is_demo:
        return session, ""
    own = ctx.folders.own(session, visitor)
    shown.delete()
    mine = "your own pictures" if own is not None and own.items() else "a set of your own"
    return own.session_id if own is not None else "", (
        f"They went to {mine}; the demo's pictures are put away (Try the demo draws them again)."
    )


def _pictures(count: int) -> str:
    return f"{count} picture{'s' if count != 1 else ''}"


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
        "report": report_html(staging.check(resolution_of(resolution), default_caption or "")),
        "page": pages_update(staging),
    }


# What each of the doctor's one-click fixes is called on its button.
FIX_WORDS = {
    "keep-first": "Keep the first, remove the rest",
    "remove": "Remove them",
    "remove-before": "Remove them",
    "add-trigger": "Add the trigger word",
    "match-trigger": "Write it the same everywhere",
}


def check_problems(ctx: Ctx, visitor: Visitor, base_model: str, trigger: str, **checks: Any) -> dict[str, Any]:
    """The dataset doctor's findings on the visitor's pictures (for the base model's family, where it is known)."""
    staging = Staging.find(ctx.runs_dir, checks["session"], visitor)
    if staging is None or not staging.items():
        return {"findings": [], "doctor_notice": notice("Add pictures first.", "warning")}
    try:
        found = diagnose(
            staging.folder,
            resolution_of(checks["resolution"]),
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


def _adding(staging: Staging, add, note: str = "") -> str:
    """Add files (`add(staging)`) and say how many pictures (and before pictures) came in, where (`note`), and what
    was left out and why."""
    pictures, befores = len(staging.items()), len(staging.before_pictures())
    notes = add(staging)
    pictures, befores = len(staging.items()) - pictures, len(staging.before_pictures()) - befores
    added = [_pictures(pictures)] if pictures or not befores else []
    added += [f"{befores} before picture{'s' * (befores != 1)}"] if befores else []
    text = f"Added {' and '.join(added)}."
    return notice(" ".join([text, *([note] if note else []), *notes]), "warning" if notes else "info")


def _changed(count: int) -> str:
    return notice(f"{count} caption{'s' if count != 1 else ''} changed.")
