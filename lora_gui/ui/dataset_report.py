"""The Dataset tab's Checks box (what training will make of the pictures, in words) and the page slider, which every
change to the staged pictures draws again."""

from __future__ import annotations

import html
import math
from typing import Any

import gradio as gr

from lora_gui.config import TrainConfig
from lora_gui.owners import Visitor
from lora_gui.staging import DatasetReport, Staging
from lora_gui.ui.common import Ctx

PAGE_SIZE = 40
_LIST_AT_MOST = 8
# What every edit of the staged pictures reads: the folder shown, and what the checks depend on.
CHECKS = ["session", "resolution", "default_caption", "dataset_version"]


def resolution_of(value: float | None) -> int:
    return int(value) if value else TrainConfig().resolution


def shown_again(ctx: Ctx, visitor: Visitor, checks: dict[str, Any], version: int) -> dict[str, Any]:
    """The grid redrawn (a new dataset_version) and the checks, after captions changed."""
    return {
        "dataset_version": version,
        "report": checks_html(ctx, visitor, checks["session"], checks["resolution"], checks["default_caption"]),
    }


def pages_update(staging: Staging) -> dict[str, Any]:
    """The page slider: shown only when the pictures don't fit on one page."""
    pages = max(1, math.ceil(len(staging.items()) / PAGE_SIZE))
    return gr.update(maximum=max(pages, 2), visible=pages > 1, value=1)  # a slider needs max > min


def checks_html(ctx: Ctx, visitor: Visitor, session: str, resolution: float, default_caption: str) -> str:
    staging = Staging.find(ctx.runs_dir, session, visitor)
    if staging is None:
        return report_html(None)
    return report_html(staging.check(resolution_of(resolution), default_caption or ""))


def _names(names: list[str]) -> str:
    shown = ", ".join(html.escape(name) for name in names[:_LIST_AT_MOST])
    more = len(names) - _LIST_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


def _pair_lines(report: DatasetReport) -> list[str]:
    """What the edit pairs lack, when before pictures were given: partners, and a shape in common."""
    lines = []
    if report.no_before:
        count = len(report.no_before)
        lines.append(
            f"⚠ <b>{count} after picture{'s have' if count != 1 else ' has'} no before picture</b> "
            f"({'they are' if count != 1 else 'it is'} left out): {_names(report.no_before)}. Add "
            f"{'a before picture of the same name for each' if count != 1 else 'one of the same name'} under "
            "<i>Before pictures</i>."
        )
    if report.no_after:
        count = len(report.no_after)
        lines.append(
            f"⚠ <b>{count} before picture{'s have' if count != 1 else ' has'} no after picture</b> of "
            f"{'their' if count != 1 else 'its'} name (not used): {_names(report.no_after)}."
        )
    if report.reshaped:
        count = len(report.reshaped)
        lines.append(
            f"⚠ <b>{count} pair{'s differ' if count != 1 else ' differs'} in shape</b>, so "
            f"{'their before pictures are' if count != 1 else 'its before picture is'} stretched to the after "
            f"picture's shape: {_names(report.reshaped)}."
        )
    return lines


def report_html(report: DatasetReport | None) -> str:
    """The checks in plain words: what will be trained on, and every reason a file won't be."""
    if report is None or not (report.usable or report.uncaptioned or report.unusable or report.no_after):
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
        what = ("edit pair" if report.paired else "picture") + ("s" if count != 1 else "")
        whose = " (the after pictures)" if report.paired else ""
        lines.append(f"✓ <b>{count} {what} ready to train</b>, {sizes} pixels{whose}.")
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
    lines += _pair_lines(report)
    items = "".join(f"<li>{line}</li>" for line in lines)
    return f'<div class="lg-checks"><b>Checks</b><ul>{items}</ul></div>'
