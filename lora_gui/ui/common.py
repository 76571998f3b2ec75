"""What every tab shares: `Ctx` (the page's wiring and the services its handlers call), and small display helpers."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio import processing_utils
from gradio import utils as gradio_utils

from lora_gui.errors import LoraGuiError
from lora_gui.limits import Limits
from lora_gui.owners import Visitor
from lora_gui.runs import RunFolder
from lora_gui.ui.captioning import Captioning
from lora_gui.ui.engine import Engine
from lora_gui.ui.folders import Folders
from lora_gui.ui.model_choices import ModelChoices
from lora_gui.ui.page import Page

# The two layouts a run's LoRA can be downloaded in, named by the programs that load them.
# AUTOMATIC1111 runs Stable Diffusion models only; Forge and ComfyUI run Flux.1 too.
LOADS_IN = {"kohya": "AUTOMATIC1111 (Stable Diffusion), Forge and ComfyUI", "diffusers": "diffusers (Python)"}
LAYOUT_CHOICES = [
    (f"For {LOADS_IN['kohya']} (<run name>.safetensors)", "kohya"),
    (f"For {LOADS_IN['diffusers']} (pytorch_lora_weights.safetensors)", "diffusers"),
]


@dataclass(kw_only=True)
class Ctx(Page):
    """What each tab builder is handed: the page's wiring (page.py) and the services its handlers call."""

    runs_dir: Path
    limits: Limits  # what one visitor may use (limits.py)
    engine: Engine  # the runs, Generate and the GPU, loaded apart from the page (engine.py)
    models: ModelChoices  # the base models a visitor may pick or type (model_choices.py)
    folders: Folders  # a visitor's runs and staged pictures (folders.py)
    captioning: Captioning  # captions written by a model (captioning.py)

    def before_handling(self) -> None:
        """Every event waits for the engine's loader: handlers import the engine's modules where they use them, and
        two threads importing diffusers at once can find it half made (Python, to avoid a deadlock, hands one of
        them the module before its import has finished: "cannot import name 'DiffusionPipeline'")."""
        self.engine.load()


def served(path: str | Path) -> str:
    """A run's file as the page may fetch it: a copy in Gradio's upload folder under a name made from its content.

    The runs folder itself is never served by URL (its pictures and checkpoints are private), so a handler hands
    out copies of only what its visitor may have; the copy is what Gradio would make itself, made here so that
    a runs folder outside the working and temporary folders (a Space's /data) works the same."""
    return processing_utils.save_file_to_cache(path, cache_dir=gradio_utils.get_upload_folder())


def build_export(prefix: str) -> dict[str, Any]:
    """A layout choice, a button and the file to download: a run's LoRA for the program the user has."""
    c: dict[str, Any] = {}
    c[f"{prefix}_layout"] = gr.Radio(
        LAYOUT_CHOICES,
        value="kohya",
        label="Which program will load it?",
        info="Both files hold the same LoRA. AUTOMATIC1111 and Forge: put it in models/Lora; ComfyUI: models/loras.",
    )
    c[f"{prefix}_export"] = gr.Button("Get the LoRA file", size="sm")
    c[f"{prefix}_export_notice"] = gr.HTML()
    c[f"{prefix}_file"] = gr.File(label="Your LoRA file (click its name to download)", interactive=False, visible=False)
    return c


def export_lora(ctx: Ctx, visitor: Visitor, prefix: str, run_name: str | None, layout: str) -> dict[str, Any]:
    """(Re)write a run's LoRA in a layout and offer it in the widgets `build_export(prefix)` made.

    export_run rebuilds the kohya file from the run folder, so it is current even for a run an older
    version of the app trained."""
    from lora_gui.lora_files.export import export_run

    if not run_name:
        return {f"{prefix}_export_notice": notice("Pick a run first.", "warning"), f"{prefix}_file": gr.skip()}
    try:
        (path,) = export_run(run_with_lora(ctx, visitor, run_name).path, layout)
    except LoraGuiError as error:
        return {f"{prefix}_export_notice": error_notice(error), f"{prefix}_file": gr.update(visible=False)}
    return {
        f"{prefix}_export_notice": notice(
            f"{path.name} is ready for {loads_in(path.parent, layout)}: click its name below."
        ),
        f"{prefix}_file": gr.update(value=served(path), visible=True),
    }


def run_with_lora(ctx: Ctx, visitor: Visitor, run_name: str) -> RunFolder:
    """A visitor's run that saved a LoRA file; one that did not is said so in words (the engine's own message names
    the run's folder on the server, which a page never shows)."""
    run = ctx.folders.run(run_name, visitor)
    if not run.diffusers_lora.is_file():
        raise LoraGuiError(
            f"the run {run.name} saved no LoRA file: it ended before its first save. "
            "Train it again, or pick another run"
        )
    return run


def hub_token_box(elem_id: str, visible: bool = True) -> gr.Textbox:
    """A Hugging Face token for downloading a gated base model: hidden as it is typed, handed to the one download
    it is given for, and never saved. `visible`: shown at first (a page that shows it only for a gated model)."""
    return gr.Textbox(
        "",
        type="password",
        label="Hugging Face token (only for gated models such as FLUX.1-dev; used for this download, never saved)",
        placeholder="hf_...",
        info="First accept the model's licence on its Hugging Face page. Make a token with read access at "
        "huggingface.co/settings/tokens.",
        elem_id=elem_id,
        visible=visible,
    )


def loads_in(run_dir: Path, layout: str) -> str:
    """The programs a run's LoRA file in this layout loads in: the kohya file's depend on the model's family."""
    from lora_gui.families import get_family
    from lora_gui.runs import RunFolder, TrainingRecord

    if layout != "kohya":
        return LOADS_IN[layout]
    try:
        family = TrainingRecord.load(RunFolder(run_dir)).family
    except LoraGuiError:  # a run saved before the record was kept: the file is written from it all the same
        return LOADS_IN[layout]
    return get_family(family).kohya_file_loads_in


def files_label(kind: str, diffusers_file: str = "pytorch_lora_weights.safetensors") -> str:
    """The label of a list of a run's files that says which LoRA file loads where."""
    return (
        f"{kind} (click to download): the one named after the run is for {LOADS_IN['kohya']}; "
        f"{diffusers_file} is for {LOADS_IN['diffusers']}"
    )


def plain_error(error: Exception) -> str:
    """A LoraGuiError's message as a sentence for the page."""
    text = str(error)
    if not any(mark in text.split(" ", 1)[0] for mark in "./\\"):  # a file name or path stays as it is spelled
        text = text[:1].upper() + text[1:]
    return text + ("" if text.endswith(".") else ".")


def notice(text: str, kind: str = "info", link: str = "") -> str:
    """A short message box; kind is info, warning or error; a link (a URL) goes at its end."""
    icon = {"info": "ℹ", "warning": "⚠", "error": "✗"}[kind]
    anchor = f' <a href="{html.escape(link)}" target="_blank" rel="noopener">{html.escape(link)}</a>' if link else ""
    return f'<div class="lg-notice lg-{kind}">{icon} {html.escape(text)}{anchor}</div>'


def error_notice(error: LoraGuiError) -> str:
    return notice(plain_error(error), "error")


VALIDATION_CURVE = "validation loss (held-out pictures)"


def loss_frame(
    points: list[tuple[int, float]], validation: Sequence[tuple[int, float]] | None = None
) -> pd.DataFrame | None:
    """Loss per step, raw and smoothed, and the validation loss where it was measured (None: a run without one),
    in the long form LinePlot draws one line per series from.

    None when there is no loss yet: a plot first drawn from an empty table never draws its lines.

    Diffusion losses jump around from step to step; the smoothed line (a debiased exponential
    moving average, as TensorBoard draws it) shows the trend a person should read. The validation loss is
    measured at fixed noise on pictures never trained on: it needs no smoothing, and says when to stop.
    """
    if not points:
        return None
    weight = 0.9 if len(points) > 20 else 0.6
    smoothed, average = [], 0.0
    for index, (_, loss) in enumerate(points, 1):
        average = weight * average + (1 - weight) * loss
        smoothed.append(average / (1 - weight**index))
    series = {
        "loss at each step": points,
        "smoothed": list(zip((step for step, _ in points), smoothed, strict=True)),
    }
    if validation is not None:
        # A plot keeps the series of its first drawing: one still to be measured is there from the start, empty.
        series[VALIDATION_CURVE] = validation or [(points[0][0], None)]
    rows = [{"step": step, "loss": loss, "curve": name} for name, curve in series.items() for step, loss in curve]
    return pd.DataFrame(rows)


def loss_plot(elem_id: str, label: str = "Loss (lower is better)") -> gr.LinePlot:
    return gr.LinePlot(
        value=None,
        elem_id=elem_id,
        x="step",
        y="loss",
        color="curve",
        color_map={"loss at each step": "#c7d2fe", "smoothed": "#4338ca", VALIDATION_CURVE: "#ea580c"},
        label=label,
        x_title="step",
        y_title="loss",
    )


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "working out the time left"
    seconds = round(seconds)
    if seconds < 90:
        return f"about {seconds} s left"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"
