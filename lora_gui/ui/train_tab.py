"""The Train tab: base model, settings, Start / Stop, and the live view of the run.

The run itself lives in the JobManager; this tab only submits it and polls its state, so a reloaded
page (or a second visitor) sees the same run.
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_gui import memory_savers, quantization, runs
from lora_gui.config import (
    TrainConfig,
)
from lora_gui.errors import ConfigError, LoraGuiError
from lora_gui.families import REGISTRY, base_for_training, get_family
from lora_gui.optimizers import OPTIMIZERS, settings_for_optimizer
from lora_gui.owners import EVERYONE, Visitor
from lora_gui.staging import Staging
from lora_gui.ui import config_form
from lora_gui.ui.common import (
    Ctx,
    duration,
    error_notice,
    files_label,
    hub_token_box,
    loss_frame,
    loss_plot,
    notice,
    plain_error,
    served,
)
from lora_gui.ui.model_choices import TINY_CHOICE, TINY_CHOICES
from lora_gui.ui.presets import PRESET_HELP, describe_preset, keep_preset, preset_choices, use_preset

if TYPE_CHECKING:
    from lora_gui.estimate import Estimate
    from lora_gui.jobs import Job, JobState

POLL_SECONDS = 2.0
_WATCHED = ("losses", "samples", "log", "files")


def build_train_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    # Shown once the engine has loaded and found no GPU (app.engine_ready).
    c["cpu_warning"] = gr.HTML(
        notice(
            "No NVIDIA GPU (CUDA) was found, so training runs on the processor. That is fine for the demo "
            "and tiny models (about a minute), but a full-size model (Stable Diffusion, Flux) would take many hours.",
            "warning",
        ),
        elem_id="cpu-warning",
        visible=ctx.engine.loaded and not ctx.engine.has_cuda,
    )
    gr.Markdown("**Step 2: train.** Pick a base model and how long to train, then press **Start training**.")
    c.update(_build_model_and_preset(ctx))
    c.update(config_form.build_widgets(main=True, per_row=4))
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
        c.update(config_form.build_widgets(main=False, per_row=3))
        with gr.Row():
            c["preset_name"] = gr.Textbox(label="Save these settings as a preset named", placeholder="my-settings")
            c["save_preset"] = gr.Button("Save as preset")
    return c


def _build_live_view() -> dict[str, Any]:
    """The run as it trains: its progress, loss, previews, files and log."""
    c: dict[str, Any] = {}
    c["progress"] = gr.HTML(_progress_html(None, 0), elem_id="train-progress")
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
    ctx.wire(
        ctx["suggest"].click,
        suggest_settings,
        ["session", "base_model", "subject", *settings],
        ["suggestions", *settings],
        api_name="suggest",
    )
    ctx.wire(
        ctx["base_model"].change,
        show_token_box,
        ["base_model"],
        ["hf_token"],
        api_visibility="private",
        show_progress="hidden",
    )
    ctx.wire(
        ctx["dataset_version"].change,
        idle_progress,
        ["session", "train_job"],
        ["progress"],
        api_visibility="private",
        show_progress="hidden",
    )
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
        staging = Staging.find(ctx.runs_dir, session, visitor)
        if staging is None or not staging.check(config.resolution, config.default_caption).usable:
            raise LoraGuiError("there are no usable pictures yet: add some in the Dataset tab first")
        name = (run_name or "").strip() or ctx.folders.suggest_run_name(visitor)
        folder, taken = _free_run_folder(ctx, name, visitor)
        ctx.folders.check_room_for_a_run(visitor)
        job = ctx.engine.jobs.submit_new(config, folder, staging.folder, hub_token=token, owner=visitor.owner)
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


def show_token_box(ctx: Ctx, base_model: str) -> dict[str, Any]:
    """The Hugging Face token box, only for a base model whose download may need a token."""
    return {"hf_token": gr.update(visible=ctx.models.needs_token(base_model))}


def stop(ctx: Ctx, visitor: Visitor, train_job: int | None) -> dict[str, Any]:
    job = _shown_job(ctx, visitor, train_job)
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
    job = _shown_job(ctx, visitor, train_job)
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


def suggest_settings(
    ctx: Ctx, visitor: Visitor, session: str, base_model: str, subject: str, **settings: Any
) -> dict[str, Any]:
    """Settings for the visitor's staged pictures of a person, an object or a style, on this computer's GPU, each
    with its reason; only what fits the card by the estimate."""
    if not subject:
        return {"suggestions": notice("Say first what the pictures are of: a person, an object or a style.", "warning")}
    try:
        config = config_form.config_from_values({**settings, "base_model": ""})
        family = config.family if config.family != "auto" else ctx.models.family(base_model)
        if family is None:
            raise ConfigError(
                "to suggest settings, the kind of model must be known without downloading it: set 'Model family' "
                "under Advanced settings"
            )
        staging = Staging.find(ctx.runs_dir, session, visitor)
        usable = staging.check(config.resolution, config.default_caption).usable if staging is not None else []
        if not usable:
            raise LoraGuiError("there are no usable pictures yet: add some in the Dataset tab first")
        from lora_gui.suggest import Card, Pictures, suggest

        suggestion = suggest(Pictures.of(usable), subject, family, Card.here(), config)
    except LoraGuiError as error:
        return {"suggestions": error_notice(error)}
    reasons = "".join(
        f"<li><b>{html.escape(config_form.label(change.setting))}</b>: {html.escape(change.value_text)}. "
        f"{html.escape(change.reason[:1].upper() + change.reason[1:])}.</li>"
        for change in suggestion.changes
    )
    notes = " ".join(html.escape(note) for note in suggestion.notes)
    return {
        "suggestions": f'<div class="lg-suggestions"><p>{notes}</p><ul>{reasons}</ul></div>',
        **config_form.widget_values(suggestion.config),
    }


def show_estimate(ctx: Ctx, base_model: str, **settings: Any) -> dict[str, Any]:
    """About how much GPU memory and time a run with these settings takes, before it is started."""
    from lora_gui import devices
    from lora_gui.estimate import estimate, presets_that_fit

    try:
        config = config_form.config_from_values({**settings, "base_model": ""})
    except LoraGuiError as error:
        return {"estimate": notice(f"No estimate until the settings are fixed: {plain_error(error)}", "warning")}
    family = config.family if config.family != "auto" else ctx.models.family(base_model)
    if family is None:
        return {
            "estimate": notice(
                "To estimate GPU memory and time, the kind of model must be known without downloading it: set "
                f"'Model family' under Advanced settings ({', '.join(f.title for f in REGISTRY.values())})."
            )
        }
    title = get_family(family).title
    tiny = base_model in TINY_CHOICES
    precision = devices.gpu_precision(config.mixed_precision)
    try:
        result = estimate(config, family, precision, None if tiny else ctx.engine.gpu_tflops())
    except (ValueError, RuntimeError) as error:  # peft refuses layer names that match nothing in the UNet
        return {"estimate": notice(f"No estimate for these settings: {error}", "warning")}
    memory = f"≈ {result.memory_gb:.1f} GB of GPU memory"
    if tiny:
        text = (
            f"The demo and tiny models need almost no memory and train on a processor in about a minute. For "
            f"comparison, a real {title} model with these settings would need {memory}."
        )
    elif not ctx.engine.has_cuda:
        text = (
            f"On a GPU, these settings would need {memory} ({title}). This computer has no NVIDIA GPU, so training "
            "would run on the processor: far slower than any GPU (many hours), so no time estimate is given."
        )
        try:
            quantization.check_available(config.quantize_base, on_cuda=False)
        except LoraGuiError as error:  # said now, not only when Start fails
            text += " " + plain_error(LoraGuiError(config_form.labelled(str(error))))
    else:
        text = f"Estimate for {title}: {result.summary()}"
        if result.seconds is None and config.epochs:
            text += " The time depends on how many pictures you have, as Epochs is set."
        elif result.seconds is None:
            text += " The time shows once no run is training: this GPU's speed is measured then."
        total = devices.gpu_memory_gb() or 0.0
        fitting = presets_that_fit(family, precision, total)
        if result.memory_gb > total:
            text += f" That is more than this GPU's {total:.0f} GB: " + _memory_advice(config, result, fitting)
        elif fitting:
            name, memory_gb = fitting[0]
            text += (
                f" Of the presets for {title}, {name} makes the most of this {total:.0f} GB GPU (≈ {memory_gb:.1f} GB)."
            )
    hint = "" if tiny else get_family(family).resolution_hint(config.resolution)
    trained_instead = base_for_training(base_model)[1]  # a distilled model's base, and why
    notes = (notice(hint, "warning") if hint else "") + (notice(trained_instead) if trained_instead else "")
    return {"estimate": notice(text) + notes}


def pick_optimizer(ctx: Ctx, base_model: str, **settings: Any) -> dict[str, Any]:
    """Settings that fit the optimizer just picked, so the form stays valid (Prodigy's learning rate is 1.0, where
    AdamW's is 1e-4), the learning rate's hint for it, and the estimate, which its state changes."""
    optimizer = settings["optimizer"]
    changes = settings_for_optimizer(
        optimizer,
        settings["learning_rate"],
        settings["text_encoder_learning_rate"],
        settings["lr_scheduler"],
        settings["lr_warmup_steps"],
    )
    rate = {"value": changes["learning_rate"]} if "learning_rate" in changes else {}
    return {
        **changes,
        "learning_rate": gr.update(info=OPTIMIZERS[optimizer].rate_help, **rate),
        **show_estimate(ctx, base_model, **{**settings, **changes}),
    }


def _memory_advice(config: TrainConfig, result: Estimate, fitting: list[tuple[str, float]]) -> str:
    """What lowers the phase that needs the most memory: first the preset made for this card, if one is."""
    preset = f"pick the {fitting[0][0]} preset (≈ {fitting[0][1]:.1f} GB), or " if fitting else ""
    if result.previews_gb >= result.training_gb:
        # Previews decode a full-size picture; the low-VRAM presets keep the resolution, so they don't help.
        tips = ", ".join(memory_savers.form_tips(config, memory_savers.PREVIEWS))
        return preset + (f"{tips}: " if tips else "") + "the preview images need the most."
    tips = memory_savers.form_tips(config, memory_savers.TRAINING)
    return preset + "".join(f"{tip}, " for tip in tips) + "or pick a low-VRAM preset."


def poll(
    ctx: Ctx, visitor: Visitor, train_job: int | None, train_seen: dict[str, Any], train_notice: str | None = None
) -> dict[str, Any]:
    """The live view of the visitor's run; parts that have not changed since this page's last look are skipped. The
    notice above goes once it is stale: an error of an earlier try while a run trains, and "started" once the run
    has ended (the progress says how)."""
    job = _shown_job(ctx, visitor, train_job)
    if job is None:
        return {"progress": _progress_html(None, 0), "train_seen": {}} if train_seen else {}
    state = job.snapshot()
    seen = {"job": state.job_id, "status": state.status, **{name: len(getattr(state, name)) for name in _WATCHED}}
    fresh = seen.get("job") != train_seen.get("job")
    changed = {name for name in _WATCHED if fresh or seen[name] != train_seen.get(name)}
    updates: dict[str, Any] = {
        "progress": _progress_html(state, ctx.engine.jobs.queue_position(state.job_id)),
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


def _shown_job(ctx: Ctx, visitor: Visitor, train_job: int | None) -> Job | None:
    """The run this page started, else the visitor's run training now (or trained last); never another visitor's."""
    job = ctx.engine.jobs.get(train_job) if train_job else None
    return job if job is not None and visitor.owns(job.owner) else ctx.engine.jobs.latest(visitor)


def idle_progress(ctx: Ctx, visitor: Visitor, session: str, train_job: int | None) -> dict[str, Any]:
    """What the progress says while no run of the visitor's is shown, after the pictures changed: what is next."""
    if _shown_job(ctx, visitor, train_job) is not None:
        return {}
    staging = ctx.folders.staged(session, visitor)
    return {"progress": _progress_html(None, 0, pictures=len(staging.items()) if staging is not None else 0)}


def _progress_html(state: JobState | None, queue_position: int, pictures: int = 0) -> str:
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
        return notice(f"Training {state.run_name} failed: {state.error}", "error") + f"<p>{_failure_hint(state)}</p>"
    return (
        f'<div class="lg-progress"><div class="lg-progress-text">{headline} <span>{detail}</span></div>'
        f'<div class="lg-bar"><div style="width:{percent:.1f}%"></div></div></div>'
    )


def _failure_hint(state: JobState) -> str:
    if runs.RunFolder(Path(state.run_dir)).latest_checkpoint() is not None:
        return "Its last checkpoint is kept: fix the problem, then press Resume this run."
    return "Nothing was trained yet: fix the problem, then press Start training again (your pictures are kept)."
