"""The Train tab: base model, settings, Start / Stop, and the live view of the run.

The run itself lives in the JobManager; this tab only submits it and polls its state, so a reloaded
page (or a second visitor) sees the same run.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import gradio as gr

from lora_gui.config import TrainConfig
from lora_gui.errors import LoraGuiError
from lora_gui.families import REGISTRY, get_family
from lora_gui.owners import EVERYONE, Visitor
from lora_gui.staging import Staging
from lora_gui.ui import config_form
from lora_gui.ui.common import (
    Ctx,
    error_notice,
    files_label,
    hub_token_box,
    loss_plot,
    notice,
)
from lora_gui.ui.model_choices import TINY_CHOICE, quick_settings
from lora_gui.ui.presets import PRESET_HELP, describe_preset, keep_preset, preset_choices, use_preset
from lora_gui.ui.train_live import progress_html, shown_job, wire_live_view
from lora_gui.ui.train_settings import (
    pick_optimizer,
    rate_hint,
    settings_for_model,
    show_estimate,
    show_token_box,
    suggest_settings,
)


def build_train_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    # Shown once the engine has loaded and found no GPU (app.engine_ready).
    c["cpu_warning"] = gr.HTML(
        notice(
            "No NVIDIA GPU (CUDA) was found, so training runs on the processor. That is fine for the demo "
            "and tiny models (the estimate below says how long), but a full-size model (Stable Diffusion, Flux) would "
            "take many hours.",
            "warning",
        ),
        elem_id="cpu-warning",
        visible=ctx.engine.loaded and not ctx.engine.has_cuda,
    )
    gr.Markdown("**Step 2: train.** Pick a base model and how long to train, then press **Start training**.")
    c.update(_build_model_and_preset(ctx))
    # The settings the base model the page starts with (the demo model) is made for; picking another sets its own.
    c.update(config_form.build_widgets(main=True, per_row=4, defaults=quick_settings(TINY_CHOICE)))
    c["estimate"] = gr.HTML(elem_id="train-estimate")
    c.update(_build_start(ctx))
    c.update(_build_live_view())
    return c


def _build_model_and_preset(ctx: Ctx) -> dict[str, Any]:
    """The base model, a preset, and the settings suggested for the visitor's pictures."""
    c: dict[str, Any] = {}
    with gr.Row():
        where = "a Hugging Face Hub id (owner/name)"
        if ctx.models.allow_paths:
            where += ", a diffusers model folder or a .safetensors checkpoint file on this computer"
        with gr.Column(scale=2):
            c["base_model"] = gr.Dropdown(
                choices=ctx.models.choices(),
                value=TINY_CHOICE,
                allow_custom_value=True,
                label="Base model",
                info=f"The model your LoRA adds to. Pick one, or type {where}.",
            )
            # Shown only for a model whose download may need one (`show_token_box`).
            c["hf_token"] = hub_token_box("train-hf-token", visible=ctx.models.needs_token(TINY_CHOICE))
        with gr.Column(scale=2):
            c["preset"] = gr.Dropdown(
                choices=preset_choices(),
                value=None,
                label="Preset (ready-made settings)",
                info=PRESET_HELP,
            )
            c["load_preset"] = gr.Button("Use this preset", size="sm")
    with gr.Row(equal_height=True):
        c["subject"] = gr.Radio(
            choices=[("a person", "person"), ("an object", "object"), ("a style", "style")],
            value=None,  # no guess: a wrong one would suggest the wrong settings without a word
            label="What are the pictures of?",
            info="With the pictures in the Dataset tab and this computer's GPU, it decides the suggested settings.",
            scale=3,
        )
        c["trigger_word"] = config_form.build_widget("trigger_word")
        c["suggest"] = gr.Button("Suggest settings", size="sm", scale=1, elem_id="suggest-settings")
    c["suggestions"] = gr.HTML(elem_id="train-suggestions")
    return c


def _build_start(ctx: Ctx) -> dict[str, Any]:
    """The run's name, Start and Stop, and the advanced settings."""
    c: dict[str, Any] = {}
    with gr.Row():
        c["run_name"] = gr.Textbox(
            # Worked out as each page opens (a name from when the app started may be taken by now); a visitor's
            # own, where visitors are strangers, once `restore` knows who they are.
            value=functools.partial(ctx.folders.suggest_run_name, EVERYONE) if not ctx.shared else "",
            label="Run name",
            info="The folder your LoRA and previews go in; a fresh name is suggested after each start.",
            scale=2,
        )
        c["start"] = gr.Button("Start training", variant="primary", scale=1, elem_id="start-training")
        # Quiet and off until a run of this visitor's trains (`poll`): Start is the one loud button.
        c["stop"] = gr.Button("Stop", variant="secondary", interactive=False, scale=1, elem_id="stop-training")
    c["train_notice"] = gr.HTML(elem_id="train-notice")
    with gr.Accordion("Advanced settings", open=False):
        gr.Markdown("The defaults work; change these only if you know why. Every box says what it does.")
        c.update(config_form.build_widgets(main=False, per_row=3, defaults=quick_settings(TINY_CHOICE)))
        with gr.Row():
            c["preset_name"] = gr.Textbox(label="Save these settings as a preset named", placeholder="my-settings")
            c["save_preset"] = gr.Button("Save as preset")
    return c


def _build_live_view() -> dict[str, Any]:
    """The run as it trains: its progress, loss, previews, files and log."""
    c: dict[str, Any] = {}
    c["progress"] = gr.HTML(progress_html(None, 0), elem_id="train-progress")
    with gr.Row():
        with gr.Column():
            c["loss_plot"] = loss_plot("loss-plot")
            c["validation"] = gr.HTML(elem_id="validation-text")  # the validation loss's best step, in words
        c["samples"] = gr.Gallery(
            label="Previews (made every few steps with your sample prompt)",
            columns=2,  # two across: each at least 256 px wide, so a 64 px picture is drawn large enough to judge
            height=560,
            object_fit="contain",
            preview=False,
            elem_id="train-samples",
            elem_classes=["lg-previews"],
        )
    c["files"] = gr.File(
        label=files_label("Your LoRA"),
        file_count="multiple",
        interactive=False,
        visible=False,
        elem_id="train-files",
    )
    c["resume"] = gr.Button("Resume this run", visible=False)
    c["log"] = gr.Textbox(label="Log (newest first)", lines=8, max_lines=8, interactive=False)
    c["train_job"] = gr.State(None)
    c["train_seen"] = gr.State({})
    return c


def wire_train_tab(ctx: Ctx) -> None:
    settings = config_form.field_names()
    ctx.wire(
        ctx["start"].click,
        start,
        ["session", "run_name", "base_model", "hf_token", *settings],
        ["train_notice", "train_job", "run_name", "train_seen", "stop"],
        api_name="start",
    )
    ctx.wire(ctx["stop"].click, stop, ["train_job"], ["train_notice"], api_name="stop")
    ctx.wire(
        ctx["resume"].click,
        resume,
        ["train_job", "hf_token", *RESUMED_FROM_THE_FORM],
        ["train_notice", "train_job", "train_seen"],
    )
    _wire_settings(ctx, settings)
    wire_live_view(ctx)


def _wire_settings(ctx: Ctx, settings: list[str]) -> None:
    """The settings as they are filled in: suggested, from a preset, following the model and the optimizer."""
    ctx.wire(
        ctx["suggest"].click,
        suggest_settings,
        ["session", "base_model", "subject", *settings],
        ["suggestions", *settings],
        api_name="suggest",
    )
    quiet = {"api_visibility": "private", "show_progress": "hidden"}
    ctx.wire(ctx["base_model"].change, show_token_box, ["base_model"], ["hf_token"], **quiet)
    # Only the visitor's own pick: a preset or a restored run sets the model with its own settings.
    ctx.wire(
        ctx["base_model"].input,
        settings_for_model,
        ["base_model", *settings],
        settings,
        api_visibility="private",
        show_progress="hidden",
    )
    # The hint follows whatever set the rate; only the hint, so the change does not go off again.
    ctx.wire(ctx["learning_rate"].change, rate_hint, ["optimizer", "learning_rate"], ["learning_rate"], **quiet)
    ctx.wire(ctx["preset"].change, describe_preset, ["preset", "my_presets"], ["preset"], api_visibility="private")
    ctx.wire(ctx["load_preset"].click, use_preset, ["preset", "my_presets"], ["train_notice", "base_model", *settings])
    ctx.wire(
        ctx["save_preset"].click,
        keep_preset,
        ["preset_name", "base_model", "my_presets", *settings],
        ["train_notice", "preset", "my_presets"],
        api_visibility="private",
    )
    ctx.wire(
        # Every setting, not only those that change memory and time: the estimate also says which value is out of
        # range, and must go when that one is fixed (the optimizer's change redoes it in `pick_optimizer`).
        functools.partial(gr.on, [ctx[name].change for name in ("base_model", *settings) if name != "optimizer"]),
        show_estimate,
        ["base_model", *settings],
        ["estimate"],
        api_name="estimate",
        trigger_mode="always_last",  # a preset changes many settings at once: estimate the last state only
        show_progress="hidden",
    )
    ctx.wire(
        ctx["optimizer"].change,
        pick_optimizer,
        ["base_model", *settings],
        ["learning_rate", "text_encoder_learning_rate", "lr_scheduler", "estimate"],
        api_visibility="private",
        show_progress="hidden",
    )


# ---- handlers ----------------------------------------------------------------------------------
def start(
    ctx: Ctx,
    visitor: Visitor,
    session: str,
    run_name: str,
    base_model: str,
    hf_token: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Check everything that can be checked now, then queue the run on the pictures as they are now. The token
    goes to the job, which hands it to the base model's download only."""
    try:
        token = ctx.models.hub_token(hf_token, visitor)
        model = ctx.models.resolve(base_model, token)
        config = config_form.config_from_values({**settings, "base_model": model})
        staging, before = _staged_pictures(ctx, visitor, session, base_model, config)
        name = (run_name or "").strip() or ctx.folders.suggest_run_name(visitor)
        folder, taken = _free_run_folder(ctx, name, visitor)
        ctx.folders.check_room_for_a_run(visitor)
        job = ctx.engine.jobs.submit_new(
            config, folder, staging.folder, hub_token=token, owner=visitor.owner, before=before
        )
    except LoraGuiError as error:
        return {"train_notice": error_notice(error)}
    position = ctx.engine.jobs.queue_position(job.job_id)
    active = ctx.engine.jobs.active()
    if position and active is not None and active.job_id != job.job_id:
        # Whose run is ahead, and its name, is not this visitor's to learn where visitors are strangers.
        ahead = "Another run is" if ctx.shared else f"Another run ({active.run.name}) is"
        message = notice(
            f"{ahead} training right now, and only one trains at a time. Yours is "
            f"queued as number {position} and starts by itself when the runs before it end. You can close "
            "this page and come back.",
            "warning",
        )
    else:
        renamed = f"A run named {taken} exists already, so this one is named {job.run.name}. " if taken else ""
        message = notice(
            f"{renamed}Training {job.run.name} started. You can close this page: the run keeps going on the server."
        )
    return {
        "train_notice": message,
        "train_job": job.job_id,
        "run_name": ctx.folders.suggest_run_name(visitor),
        "train_seen": {},
        "stop": gr.update(interactive=True),
    }


def _staged_pictures(
    ctx: Ctx, visitor: Visitor, session: str, base_model: str, config: TrainConfig
) -> tuple[Staging, Path | None]:
    """The visitor's staged pictures a run can start on, and their before pictures where they are edit pairs (the
    run's control/ is written from them); refused in the page's words when there are none, or when pairs and the
    base model don't go together (a model of a family told without downloading)."""
    staging = Staging.find(ctx.runs_dir, session, visitor)
    report = staging.check(config.resolution, config.default_caption) if staging is not None else None
    if report is None or not report.usable:
        raise LoraGuiError(
            "no after picture has its before picture yet: add them in the Dataset tab first (same names)"
            if report is not None and report.paired
            else "there are no usable pictures yet: add some in the Dataset tab first"
        )
    family = ctx.models.family(base_model)
    editing = get_family(family).reference_images if family else report.paired  # unknown yet: the run will say
    if report.paired and not editing:
        editors = " or ".join(each.title for each in REGISTRY.values() if each.reference_images)
        raise LoraGuiError(
            "the Dataset tab has before pictures, which train an edit LoRA, but this base model makes pictures from "
            f"text alone: pick an editing model ({editors}), or remove the before pictures"
        )
    # An editing model that also makes pictures from text (trains_without_pairs) trains on pictures alone too.
    if editing and not report.paired and not get_family(family).trains_without_pairs:
        raise LoraGuiError(
            f"{get_family(family).title} learns edits from before/after pairs: add each picture's before picture "
            "under Before pictures in the Dataset tab (named as its after picture; the caption says the edit)"
        )
    return staging, staging.before_folder if report.paired else None


def _free_run_folder(ctx: Ctx, name: str, visitor: Visitor) -> tuple[Path, str]:
    """The folder for a new run named `name`, and "" ; or, when the visitor has a run of that name already (a page
    reloaded with the name it had, a name typed twice), the first free name of the same stem (cat -> cat-2,
    my-lora-1 -> my-lora-2) and `name`, so Start goes on rather than ending at "pick another name"."""
    folder = ctx.folders.new_run(name, visitor)
    if not folder.exists():
        return folder, ""
    stem, number = re.fullmatch(r"(.+?)(?:-(\d+))?", name).groups()
    for tried in range(int(number or 1) + 1, int(number or 1) + 10_000):
        folder = ctx.folders.new_run(f"{stem}-{tried}", visitor)
        if not folder.exists():
            return folder, name
    raise LoraGuiError(f"a run named {name} exists already: pick another name")


def stop(ctx: Ctx, visitor: Visitor, train_job: int | None) -> dict[str, Any]:
    job = shown_job(ctx, visitor, train_job)
    if job is None or job.snapshot().ended:
        return {"train_notice": notice("Nothing is training right now.")}
    ctx.engine.jobs.stop(job.job_id)
    return {
        "train_notice": notice(
            f"Stopping {job.run.name} after the current step; the LoRA so far is kept and the run can be resumed."
        )
    }


# The settings the Train tab's Resume takes from the form: the optimizer's, which a diverged run needs changed.
# The length of the run stays the run's own, since a reloaded page's form may not show it.
RESUMED_FROM_THE_FORM = (
    "learning_rate",
    "text_encoder_learning_rate",
    "adam_epsilon",
    "adam_weight_decay",
    "max_grad_norm",
    "prodigy_d_coef",
)


def resume(
    ctx: Ctx, visitor: Visitor, train_job: int | None, hf_token: str | None = None, **settings: Any
) -> dict[str, Any]:
    """Continue the shown run from its last checkpoint with the form's optimizer settings (a lower learning rate
    after a divergence); its other settings stay as the run started."""
    job = shown_job(ctx, visitor, train_job)
    if job is None:
        return {"train_notice": notice("There is no run to resume; resume older runs from the Runs tab.")}
    try:
        # The form's rates are checked as the run's optimizer takes them: Prodigy's 1.0 is no AdamW rate.
        run = {"base_model": "", "optimizer": TrainConfig.load(job.run.config).optimizer}
        changes = config_form.config_from_values({**settings, **run}).to_dict() if settings else {}
        changes = {name: changes[name] for name in settings}
        ctx.folders.check_room_for_a_run(visitor)
        resumed = ctx.engine.jobs.resume(
            job.run.path, hub_token=ctx.models.hub_token(hf_token, visitor), changes=changes
        )
    except LoraGuiError as error:
        return {"train_notice": error_notice(error)}
    return {
        "train_notice": notice(f"Resuming {job.run.name} from its last checkpoint."),
        "train_job": resumed.job_id,
        "train_seen": {},
    }
