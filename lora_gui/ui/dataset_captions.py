"""The Dataset tab's captioning: the captioner menu and its buttons, a pass over the visitor's pictures told as it
goes, and one picture's caption (ui/captioning.py loads the captioners and runs them)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import gradio as gr

from lora_gui.captioning import captioner_infos
from lora_gui.captioning.folder import CaptionPass, pictures_to_caption
from lora_gui.data import full_caption
from lora_gui.downloads import NotDownloaded
from lora_gui.errors import DataError, LoraGuiError
from lora_gui.owners import Visitor
from lora_gui.staging import Staging
from lora_gui.ui.captioning import TINY_CAPTIONER, TINY_TAGS
from lora_gui.ui.common import Ctx, error_notice, notice, plain_error
from lora_gui.ui.dataset_report import CHECKS, shown_again

DEFAULT_CAPTIONER = "florence2-base"
_LIST_AT_MOST = 8


def build_captioning() -> dict[str, Any]:
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
                info="Florence-2 writes sentences (photos); the WD tagger writes tags (anime, illustration); each "
                "downloads once. The tiny random tagger needs no download, but its tags are random.",
                scale=2,
                elem_id="captioner",
            )
            # Quiet buttons: the step's one loud button is Try the demo's, or Start training's. Stop shows only while
            # a pass runs, as it does nothing otherwise.
            c["caption_empty"] = gr.Button("Caption pictures without one", variant="secondary", scale=1)
            c["caption_all"] = gr.Button("Caption all (replaces captions)…", scale=1)
            c["caption_stop"] = gr.Button("Stop captioning", variant="stop", scale=0, min_width=140, visible=False)
        with gr.Row(visible=False) as c["caption_confirm_row"]:
            c["caption_confirm_text"] = gr.HTML()
            c["caption_all_yes"] = gr.Button("Yes, replace them", variant="stop")
            c["caption_all_no"] = gr.Button("No, keep them")
        c["caption_notice"] = gr.HTML(elem_id="caption-notice")
    return c


def wire_captioning(ctx: Ctx) -> None:
    checks = CHECKS
    captioned = ["dataset_version", "report", "caption_notice", "caption_confirm_row", "caption_stop"]
    # One captioning model loaded at a time, whoever asks: each takes memory (a GPU's, if it is free).
    one_at_a_time = dict(concurrency_limit=1, concurrency_id="captioning")
    # Captioning those without a caption, and all of them once the visitor said yes to replacing theirs.
    passes = (("caption_empty", False, "caption_empty"), ("caption_all_yes", True, "caption_all"))
    for button, overwrite, name in passes:
        ctx.wire(
            ctx[button].click,
            functools.partial(caption_pictures, overwrite=overwrite),
            ["captioner", "trigger", *checks],
            captioned,
            api_name=name,
            **one_at_a_time,
        )
    ctx.wire(ctx["caption_all"].click, ask_caption_all, ["session"], ["caption_confirm_row", "caption_confirm_text"])
    ctx.wire(
        ctx["caption_all_no"].click,
        lambda ctx: {"caption_confirm_row": gr.update(visible=False)},
        [],
        ["caption_confirm_row"],
    )
    ctx.wire(ctx["caption_stop"].click, stop_captioning, ["session"], ["caption_notice"], api_name="stop_captioning")


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
    in the grid as it comes, how far it got, and the captioner's download; Stop captioning shows while it runs."""
    update: dict[str, Any] = {}
    for update in _caption_pass(ctx, visitor, captioner, trigger, overwrite, **checks):
        yield {**update, "caption_stop": gr.update(visible=True)}
    yield {**update, "caption_stop": gr.update(visible=False)}


def _caption_pass(
    ctx: Ctx, visitor: Visitor, captioner: str, trigger: str, overwrite: bool, **checks: Any
) -> Iterator[dict[str, Any]]:
    """A pass told as it goes. A caption typed during the pass is kept. Runs on the GPU when no run is training on
    it, else on the processor, and says which."""
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
                **shown_again(ctx, visitor, checks, version),
                "caption_notice": notice(event.summary() + reasons, level),
            }
        elif isinstance(event, LoraGuiError):
            yield {**hidden, "caption_notice": caption_error(event)}
        else:  # a caption written, or a sentence on where the captioner runs
            done += isinstance(event, tuple)
            version += 1
            where = event if isinstance(event, str) else f"Captioned {done} of {len(todo)}…"
            yield {**shown_again(ctx, visitor, checks, version), "caption_notice": notice(where)}


def caption_one(
    ctx: Ctx, visitor: Visitor, relpath: str, captioner: str, trigger: str, **checks: Any
) -> dict[str, Any]:
    """Caption one picture (with the trigger word in front), told on its card, where Undo puts back a caption it
    replaced."""
    staging = ctx.folders.staged(checks["session"], visitor)
    if staging is None:
        return {"caption_notice": notice("Add pictures first, then caption them.", "warning")}
    version = (checks["dataset_version"] or 0) + 1
    try:
        previous = staging.caption_of(relpath)
        caption = ctx.captioning.picture(captioner, staging.folder / relpath, visitor)
        staging.set_caption(relpath, full_caption(caption, trigger or ""))
    except LoraGuiError as error:
        note = card_note(version, relpath, caption_error(error))
        return {**shown_again(ctx, visitor, checks, version), "card_note": note}
    told = "Captioned." + (f" {TINY_TAGS}" if captioner == TINY_CAPTIONER else "")
    told += " Undo puts back the caption it had." if previous else ""
    note = card_note(version, relpath, notice(told, "warning" if captioner == TINY_CAPTIONER else "info"), previous)
    return {**shown_again(ctx, visitor, checks, version), "card_note": note}


def undo_caption(ctx: Ctx, visitor: Visitor, relpath: str, previous: str, **checks: Any) -> dict[str, Any]:
    """The caption Caption it replaced, put back (kept by the server, never sent by the page)."""
    staging = ctx.folders.staged(checks["session"], visitor)
    version = (checks["dataset_version"] or 0) + 1
    try:
        if staging is None:
            raise DataError(f"{relpath} is not in this dataset (was it removed in another tab?)")
        staging.set_caption(relpath, previous)
    except LoraGuiError as error:
        note = card_note(version, relpath, error_notice(error))
        return {**shown_again(ctx, visitor, checks, version), "card_note": note}
    note = card_note(version, relpath, notice("The caption it had is back."))
    return {**shown_again(ctx, visitor, checks, version), "card_note": note}


def card_note(version: int, relpath: str, html: str, previous: str = "") -> dict[str, Any]:
    """A message drawn on one picture's card until the pictures next change (`version`), with Undo where a caption
    was replaced (`previous`)."""
    return {"version": version, "relpath": relpath, "html": html, "previous": previous}


def caption_error(error: LoraGuiError) -> str:
    """A captioning error as the page shows it; a captioner this computer can't download says what to do instead."""
    text = plain_error(error)
    if isinstance(error, NotDownloaded):
        text += f" Or type the captions under the pictures yourself. {TINY_TAGS}"
    return notice(text, "error")


def stop_captioning(ctx: Ctx, visitor: Visitor, session: str) -> dict[str, Any]:
    staging = Staging.find(ctx.runs_dir, session, visitor)
    if staging is None:
        return {"caption_notice": notice("Nothing is being captioned.")}
    ctx.captioning.stop(staging.session_id, create=False).set()
    return {"caption_notice": notice("Stopping after the pictures being captioned now; their captions are kept.")}
