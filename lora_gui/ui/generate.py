"""The Generate tab: the base model's picture and the LoRAs' picture, side by side, from one seed.

Up to MAX_LORAS LoRAs at once, each a run trained here or a file made anywhere, each at its own
strength; and a run's LoRA as a file for the program the user has. An editing model (an edit LoRA's) edits a picture
given as the prompt says, both pictures shaped like it.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_gui import data, run_dataset, runs
from lora_gui.config import TrainConfig
from lora_gui.demo import DEMO_RESOLUTION
from lora_gui.downloads import PICKLE_SUFFIXES, DownloadProgress
from lora_gui.errors import LoraGuiError
from lora_gui.families import get_family
from lora_gui.owners import Visitor
from lora_gui.quantization import GENERATE_CHOICES
from lora_gui.runs import TrainingRecord
from lora_gui.ui.common import (
    Ctx,
    build_export,
    error_notice,
    export_lora,
    hub_token_box,
    notice,
    served,
)
from lora_gui.ui.model_choices import TINY_CHOICE, TINY_CHOICES, TRAINED_CHOICES

if TYPE_CHECKING:
    from PIL import Image

    from lora_gui.downloads import DownloadProgress
    from lora_gui.infer import Generator

log = logging.getLogger(__name__)

MAX_LORAS = 3
ROW_FIELDS = ("gen_run", "gen_upload", "strength")  # each LoRA row's widgets are these, numbered from 1


# Every menu of runs with a LoRA: one per row, and the download's.
RUN_MENUS = [f"gen_run_{row}" for row in range(1, MAX_LORAS + 1)] + ["gen_export_run"]
ROWS = [f"lora_row_{row}" for row in range(1, MAX_LORAS + 1)]
MODEL_DEFAULTS = ["gen_steps", "guidance", "negative_prompt", "gen_picture"]  # what `model_defaults` fills in
PIXELS = "lg-pixels"  # app.py's CSS draws these pictures large, without smoothing
# What picking a run changes besides the settings: the word its LoRA answers to, the prompt the pick filled in, and
# the last picture's message (about the LoRA picked before).
PICKED = ["gen_trigger_note", "gen_auto_prompt", "gen_notice"]


def row_names(row: int) -> list[str]:
    return [f"{name}_{row}" for name in ROW_FIELDS]


def all_row_names() -> list[str]:
    return [name for row in range(1, MAX_LORAS + 1) for name in row_names(row)]


def build_generate_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown(
        "**Step 3: try your LoRA.** The same prompt and seed make two pictures: one by the base model alone, "
        "one with your LoRA, so you see exactly what it changed. LoRA files from elsewhere work too (from "
        "AUTOMATIC1111, ComfyUI, civitai or diffusers), and several LoRAs can be mixed, each at its own strength."
    )
    c.update(_build_lora_rows())
    c.update(_build_model_and_prompt(ctx))
    c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate-button")
    c["gen_notice"] = gr.HTML()
    with gr.Row():
        # Drawn at least 256 px wide, pixels kept sharp: the demo model's 64 px pictures would be a smudge otherwise.
        for name, label in (("base_image", "Base model alone"), ("lora_image", "With your LoRA")):
            c[name] = gr.Image(
                label=label,
                interactive=False,
                height=384,
                elem_id=name.replace("_", "-"),
                elem_classes=[PIXELS],
            )
    with gr.Accordion("Download a LoRA you trained, for another program", open=False, elem_id="gen-export"):
        c["gen_export_run"] = gr.Dropdown(
            choices=[],
            value=None,
            label="Run",
            info="Picking a run above fills this in.",
            allow_custom_value=True,
        )
        c.update(build_export("gen"))
    return c


def _build_lora_rows() -> dict[str, Any]:
    """A row per LoRA to mix in (a run or a file, and its strength), all but the first hidden at first."""
    c: dict[str, Any] = {}
    for row in range(1, MAX_LORAS + 1):
        with gr.Row(equal_height=True, visible=row == 1, elem_id=f"lora-row-{row}") as c[f"lora_row_{row}"]:
            c[f"gen_run_{row}"] = gr.Dropdown(
                choices=[],  # the visitor's own runs, filled in when the tab is opened
                value=None,
                label=f"LoRA {row}: a run you trained",
                info="Finished (or stopped) runs that saved a LoRA.",
                allow_custom_value=True,  # runs finished after the page was drawn; the handler checks the name
                scale=3,
            )
            c[f"gen_upload_{row}"] = gr.File(
                label="…or a LoRA file (.safetensors)",
                file_types=[".safetensors", *PICKLE_SUFFIXES],
                height=100,
                scale=3,
            )
            with gr.Column(scale=2):
                c[f"strength_{row}"] = gr.Slider(
                    0, 2, value=1, step=0.05, label="Strength", info="0 = no effect, 1 = as trained."
                )
                if row > 1:
                    c[f"remove_lora_{row}"] = gr.Button(f"Remove LoRA {row}", size="sm")
    c["gen_rows"] = gr.State(1)  # how many LoRA rows are shown
    with gr.Row():
        c["add_lora"] = gr.Button("+ Mix in another LoRA", size="sm", scale=0, min_width=220)
        c["allow_pickle"] = gr.Checkbox(
            False,
            label="Allow pickled files (they can run code on this computer)",
            info="Only for .bin, .pt or .ckpt LoRAs from someone you trust; .safetensors files never need this.",
            scale=1,
        )
    return c


def _build_model_and_prompt(ctx: Ctx) -> dict[str, Any]:
    """The base model and how it is stored, the prompt, and the picture's settings."""
    c: dict[str, Any] = {}
    with gr.Row():
        c["gen_base_model"] = gr.Dropdown(
            choices=ctx.models.choices(),
            value=TINY_CHOICE,
            allow_custom_value=True,
            label="Base model",
            info="Use the one the LoRA was trained on; picking a run fills it in.",
        )
        c["gen_quantize"] = gr.Dropdown(
            choices=list(GENERATE_CHOICES),
            value="auto",
            label="Store the model in fewer bits",
            info="auto: only as much as this GPU needs. int8 halves the memory; nf4 quarters it (NVIDIA GPUs, "
            "not from a single .safetensors file); none keeps it exact.",
        )
        # Only for a model that downloads (the demo and tiny models, and folders on this computer, never do).
        with gr.Column(visible=False) as c["gen_token_box"]:
            c["gen_hf_token"] = hub_token_box("gen-hf-token")
    # Shown for an editing model only (`model_defaults`): its prompt is the instruction, what to change.
    c["gen_picture"] = gr.Image(
        label="Picture to edit (the prompt says what to change)",
        type="filepath",
        sources=["upload", "clipboard"],
        height=340,  # room for the picture drawn at least 256 px (PIXELS) above its upload and paste buttons
        visible=False,
        elem_id="gen-picture",
        elem_classes=[PIXELS],
    )
    c["prompt"] = gr.Textbox("", label="Prompt", placeholder="a photo of sks dog on the beach", lines=2)
    # The word the picked run's LoRA answers to.
    c["gen_trigger_note"] = gr.HTML(visible=False, elem_id="gen-trigger-note")
    c["gen_auto_prompt"] = gr.State("")  # the prompt a picked run filled in, which the next pick may replace
    c["negative_prompt"] = gr.Textbox("", label="Negative prompt (what to avoid)", placeholder="blurry, low quality")
    with gr.Row(equal_height=True):
        c["gen_seed"] = gr.Number(0, precision=0, label="Seed", info="Same seed, same picture.")
        c["gen_steps"] = gr.Slider(1, 100, value=25, step=1, label="Steps", info="More is slower and finer.")
        c["guidance"] = gr.Slider(1, 15, value=7, step=0.5, label="Guidance", info="How closely to follow the prompt.")
        c["size"] = gr.Number(
            DEMO_RESOLUTION,  # the size the menu's first model, the demo model, draws at
            precision=0,
            label="Size (pixels)",
            info="Width and height; an edit keeps its picture's shape at about as many pixels. Picking a run or a "
            "base model fills it in.",
        )
    return c


def wire_generate_tab(ctx: Ctx) -> None:
    _wire_lora_rows(ctx)
    ctx.wire(
        ctx["gen_base_model"].input,
        pick_base_model,
        ["gen_base_model"],
        ["size", *MODEL_DEFAULTS, "gen_token_box"],
        api_visibility="private",
    )
    ctx.wire(
        ctx["generate"].click,
        generate,
        [
            *all_row_names(),
            "allow_pickle",
            "gen_base_model",
            "gen_hf_token",
            "prompt",
            "negative_prompt",
            "gen_seed",
            "gen_steps",
            "guidance",
            "size",
            "gen_quantize",
            "gen_picture",
        ],
        ["base_image", "lora_image", "gen_notice"],
        api_name="generate",
        reports_progress=True,  # a base model's download, then each picture's steps
    )
    ctx.wire(
        ctx["gen_export"].click,
        export,
        ["gen_export_run", "gen_layout"],
        ["gen_export_notice", "gen_file"],
        api_name="export_from_generate",
    )
    ctx.wire(
        ctx["generate_tab"].select,
        refresh_runs,
        ["gen_run_1", "gen_upload_1", "prompt", "gen_auto_prompt", "session", "gen_picture"],
        [*RUN_MENUS, "gen_upload_1", "gen_base_model", "size", "prompt", *MODEL_DEFAULTS, *PICKED, "gen_token_box"],
        api_visibility="private",
    )


def _wire_lora_rows(ctx: Ctx) -> None:
    """Each LoRA row's run menu, file and Remove button, and the button that adds a row."""
    for row in range(1, MAX_LORAS + 1):
        run, upload, _ = row_names(row)
        ctx.wire(
            ctx[run].input,
            pick_run,
            [run, "prompt", "gen_auto_prompt", "gen_picture"],
            [upload, "gen_base_model", "size", "prompt", "gen_export_run", *MODEL_DEFAULTS, *PICKED, "gen_token_box"],
            api_name=f"pick_run_{row}",
        )
        # A row holds one LoRA: a file dropped replaces the run picked, and the other way round (above).
        ctx.wire(
            ctx[upload].upload,
            functools.partial(forget, menu=run),
            [],
            [run, "gen_trigger_note"],
            api_visibility="private",
        )
        if row > 1:
            ctx.wire(
                ctx[f"remove_lora_{row}"].click,
                functools.partial(remove_row, row=row),
                ["gen_rows", *all_row_names()],
                ["gen_rows", "add_lora", *ROWS, *all_row_names()],
                api_visibility="private",
            )
    ctx.wire(ctx["add_lora"].click, add_row, ["gen_rows"], ["gen_rows", "add_lora", *ROWS], api_visibility="private")


def lora_runs(ctx: Ctx, visitor: Visitor) -> list[str]:
    return [summary.name for summary in ctx.folders.runs_of(visitor) if summary.has_lora]


def refresh_runs(
    ctx: Ctx,
    visitor: Visitor,
    gen_run_1: str | None,
    gen_upload_1: str | None,
    prompt: str,
    gen_auto_prompt: str = "",
    session: str = "",
    gen_picture: str | None = None,
) -> dict[str, Any]:
    """The visitor's runs in the menus; with nothing picked yet, the newest run is, so a beginner who just
    trained only has to press Generate. With no run to pick, what to do first, from where the visitor is."""
    choices = lora_runs(ctx, visitor)
    updates: dict[str, Any] = {name: gr.update(choices=choices) for name in RUN_MENUS}
    if not choices and not gen_upload_1:
        updates["gen_notice"] = notice(what_first(ctx, visitor, session))
    if choices and not gen_run_1 and not gen_upload_1:
        updates["gen_run_1"] = gr.update(choices=choices, value=choices[0])
        updates.update(pick_run(ctx, visitor, prompt, gen_auto_prompt, gen_picture, gen_run_1=choices[0]))
    return updates


def what_first(ctx: Ctx, visitor: Visitor, session: str) -> str:
    """What to do before Generate has a LoRA to try, in the words for where the visitor is now."""
    upload = " Or drop a LoRA file made elsewhere above."
    job = ctx.engine.jobs.latest(visitor)
    if job is not None and not job.done.is_set():
        return f"{job.run.name} is training in the Train tab: its LoRA shows up here once it is saved." + upload
    staging = ctx.folders.staged(session, visitor)
    pictures = len(staging.items()) if staging is not None else 0
    if pictures:
        return (
            f"Train first in the Train tab: your {pictures} picture{'s are' if pictures > 1 else ' is'} ready, "
            "press Start training there. The LoRA shows up here when training has saved it." + upload
        )
    return "Nothing trained yet: add pictures in the Dataset tab (or press Try the demo), then train." + upload


def pick_run(
    ctx: Ctx,
    visitor: Visitor,
    prompt: str,
    gen_auto_prompt: str = "",
    gen_picture: str | None = None,
    **picked: str | None,
) -> dict[str, Any]:
    """Fill in what the picked run was trained with: its base model, its size, its model's usual steps and
    guidance, and a prompt it knows, its trigger word in front, and say which word the LoRA answers to; for an edit
    run, with no picture to edit yet, one of its "before" pictures.

    A prompt the visitor typed stays: the prompt is filled in only when empty or still the one the previous pick
    filled in (`gen_auto_prompt`). `picked` is the one run menu that changed, by its name."""
    ((name, gen_run),) = picked.items()
    try:
        run = ctx.folders.run(gen_run or "", visitor)
        config = TrainConfig.load(run.config)
        family = TrainingRecord.load(run).family
    except LoraGuiError:
        return {}
    updates = {
        name.replace("gen_run", "gen_upload"): None,
        "gen_base_model": ctx.models.label(config.base_model),
        "gen_token_box": token_box(ctx, ctx.models.label(config.base_model)),
        "size": config.resolution,
        "gen_export_run": run.name,
        "gen_trigger_note": trigger_note(config.trigger_word),
        "gen_notice": "",  # the last picture's message was about the LoRA picked before
        **model_defaults(family),
    }
    if not (prompt or "").strip() or prompt == gen_auto_prompt:
        # Training put the trigger word in front of every caption: a prompt without it barely calls the LoRA up.
        filled = data.full_caption(run_dataset.run_prompt(config, run), config.trigger_word)
        updates.update(prompt=filled, gen_auto_prompt=filled)
    befores = data.picture_files(run.control) if run.control.is_dir() else []
    if get_family(family).reference_images and befores and not gen_picture:
        updates["gen_picture"] = gr.update(visible=True, value=served(befores[0]))
    return updates


def trigger_note(trigger_word: str = "") -> dict[str, Any]:
    """The one line that says what a LoRA answers to; none (hidden, taking no room) for a LoRA trained without a
    trigger word."""
    word = trigger_word.strip()
    return gr.update(
        value=notice(f"This LoRA answers to {word}; keep it in the prompt.") if word else "", visible=bool(word)
    )


def pick_base_model(ctx: Ctx, gen_base_model: str) -> dict[str, Any]:
    """A base model's usual steps and guidance, and a real one's own picture size (SDXL: 1024 px), where its
    family can be told without loading it. The demo model draws well at the size it was trained at; a tiny random
    model keeps the size: it makes any size just as well, and small is quick."""
    family = ctx.models.family(gen_base_model)
    if family is None:
        return {"gen_token_box": token_box(ctx, gen_base_model)}
    if gen_base_model in TRAINED_CHOICES:
        size = {"size": DEMO_RESOLUTION}
    elif gen_base_model in TINY_CHOICES:
        size = {}
    else:
        size = {"size": get_family(family).default_resolution}
    return {**size, **model_defaults(family), "gen_token_box": token_box(ctx, gen_base_model)}


def token_box(ctx: Ctx, gen_base_model: str) -> dict[str, Any]:
    """The Hugging Face token box, shown only for a base model whose download may need one (as the Train tab's)."""
    return gr.update(visible=ctx.models.needs_token(gen_base_model))


def model_defaults(family_name: str) -> dict[str, Any]:
    """The widgets that follow the model: its usual steps and guidance, and a negative prompt where it takes one."""
    family = get_family(family_name)
    return {
        "gen_steps": family.default_steps,
        "guidance": family.default_guidance,
        "negative_prompt": gr.update(visible=family.negative_prompt),
        "gen_picture": gr.update(visible=bool(family.reference_images)),
    }


def forget(ctx: Ctx, menu: str) -> dict[str, Any]:
    """A dropped file replaces the row's run, and what was said about that run goes with it."""
    return {menu: None, "gen_trigger_note": trigger_note()}


def add_row(ctx: Ctx, gen_rows: int) -> dict[str, Any]:
    shown = min(MAX_LORAS, (gen_rows or 1) + 1)
    return {
        "gen_rows": shown,
        **{name: gr.update(visible=row <= shown) for row, name in enumerate(ROWS, 1)},
        "add_lora": gr.update(interactive=shown < MAX_LORAS),
    }


def remove_row(ctx: Ctx, row: int, gen_rows: int, **values: Any) -> dict[str, Any]:
    """Take a row out: the rows below move up, so the shown rows stay the first ones and the LoRAs keep their order."""
    rows = [[values[name] for name in row_names(number)] for number in range(1, MAX_LORAS + 1)]
    del rows[row - 1]
    rows.append([None, None, 1.0])
    shown = max(1, (gen_rows or 1) - 1)
    updates: dict[str, Any] = {"gen_rows": shown, "add_lora": gr.update(interactive=True)}
    for number, row_values in enumerate(rows, 1):
        updates[ROWS[number - 1]] = gr.update(visible=number <= shown)
        updates.update(zip(row_names(number), row_values, strict=True))
    return updates


def generate(
    ctx: Ctx,
    visitor: Visitor,
    allow_pickle: bool,
    gen_base_model: str,
    prompt: str,
    negative_prompt: str,
    gen_seed: float,
    gen_steps: float,
    guidance: float,
    size: float,
    gen_hf_token: str | None = None,
    gen_quantize: str = "auto",
    gen_picture: str | None = None,
    progress: gr.Progress | None = None,
    **rows: Any,
) -> dict[str, Any]:
    """Both pictures from one seed. `rows` holds each LoRA row's run, uploaded file and strength by name. A base
    model not downloaded yet downloads first, with the token given, its progress over the pictures. An editing model
    edits `gen_picture` (`edit_settings`)."""
    try:
        loras = _chosen_loras(ctx, visitor, rows)
        settings = _picture_settings(prompt, negative_prompt, gen_seed, gen_steps, guidance, size, gen_quantize)
        picture = picture_to_edit(gen_picture)
        token = ctx.models.hub_token(gen_hf_token, visitor)
        model = ctx.models.resolve(gen_base_model, token)
        show = download_shower(progress) if progress is not None else None
        with ctx.engine.generators.use(model, gen_quantize, token=token, on_progress=show) as generator:
            settings, said = edit_settings(generator, picture, settings, int(size))
            # The LoRAs first: a file that can't be applied is refused before any time goes into the base picture.
            generator.set_loras(loras, allow_pickle=bool(allow_pickle))
            with_lora = generator(**settings, on_step=step_shower(progress, "With your LoRA"))
            generator.set_loras([])
            base = generator(**settings, on_step=step_shower(progress, "Base model alone"))
    except LoraGuiError as error:
        return {"gen_notice": error_notice(error)}
    except Exception as error:  # a bug or a broken model: say what it was rather than show a bare "Error"
        log.exception("Generating failed")
        return {
            "gen_notice": notice(
                f"Making the pictures failed on an unexpected error: {type(error).__name__}: {error}. "
                "The server's log has the details.",
                "error",
            )
        }
    names = ", ".join(f"{_lora_name(path)} at strength {scale:g}" for path, scale in loras)
    made = f"Made with {names}, seed {settings['seed']}.{said}"
    if gen_base_model in TINY_CHOICES and gen_base_model not in TRAINED_CHOICES:
        made += " This tiny model is random, so its pictures look like coloured noise."
    return {
        "base_image": base,
        "lora_image": gr.update(value=with_lora, label="With your LoRAs" if len(loras) > 1 else "With your LoRA"),
        "gen_notice": notice(made),
    }


def _picture_settings(
    prompt: str,
    negative_prompt: str,
    seed: float,
    steps: float,
    guidance: float,
    size: float,
    quantize: str,
) -> dict[str, Any]:
    """The generator's settings for both pictures, once the form's values are checked."""
    if not (prompt or "").strip():
        raise LoraGuiError("type a prompt first: describe the picture you want")
    if not size or not 64 <= size <= 2048:
        raise LoraGuiError("the size must be between 64 and 2048 pixels")
    if quantize not in GENERATE_CHOICES:
        raise LoraGuiError(f"Store the model in fewer bits must be one of {', '.join(GENERATE_CHOICES)}")
    return dict(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        seed=int(seed or 0),
        steps=int(steps),
        guidance=float(guidance),
        width=int(size) // 8 * 8,
        height=int(size) // 8 * 8,
    )


def picture_to_edit(gen_picture: str | None) -> Image.Image | None:
    """The picture given to edit, decoded; a sentence for one that can't be used."""
    if not gen_picture:
        return None
    try:
        return data.open_image(Path(gen_picture))
    except (data.UnusableImage, OSError) as problem:
        raise LoraGuiError(f"the picture to edit can't be used: {problem}") from None


def edit_settings(
    generator: Generator, picture: Image.Image | None, settings: dict[str, Any], size: int
) -> tuple[dict[str, Any], str]:
    """The settings for an editing model's pictures, with what to add to the notice. Given a picture to edit, both
    pictures take its shape at about size² pixels. A picture left from an editing model picked before (its box
    hidden now) is not this model's to edit; an editing model without one makes pictures from the prompt alone."""
    if not generator.family.reference_images:
        return settings, ""
    if picture is None:
        return settings, " Made from the prompt alone: add a picture to edit to see the LoRA's edit."
    width, height = generator.size_for(picture, size)
    edit = {**settings, "images": [picture], "width": width, "height": height}
    return edit, f" Your picture was edited at {width}x{height} px."


def download_shower(progress: gr.Progress) -> Callable[[DownloadProgress], None]:
    """A download's reports drawn on Gradio's progress bar. That bar finds its event through context variables,
    which the engine's reporting thread lacks: each report runs in a copy of this handler's context."""
    context = contextvars.copy_context()

    def show(download: DownloadProgress) -> None:
        context.run(progress, download.fraction, desc=f"Downloading {download.repo}: {download.summary()}")

    return show


def step_shower(progress: gr.Progress | None, picture: str) -> Callable[[int, int], None] | None:
    """How far one picture got, on Gradio's progress bar: "With your LoRA: step 12 of 25"."""
    if progress is None:
        return None
    context = contextvars.copy_context()  # as download_shower's: whichever thread the pipeline reports from

    def show(step: int, steps: int) -> None:
        context.run(progress, step / steps, desc=f"{picture}: step {step} of {steps}")

    return show


def export(ctx: Ctx, visitor: Visitor, gen_export_run: str | None, gen_layout: str) -> dict[str, Any]:
    return export_lora(ctx, visitor, "gen", gen_export_run, gen_layout)


def _lora_name(path: Path) -> str:
    return f"the LoRA of {runs.RunFolder(path.parent).name}" if path.name == runs.DIFFUSERS_LORA else path.name


def _chosen_loras(ctx: Ctx, visitor: Visitor, rows: dict[str, Any]) -> list[tuple[Path, float]]:
    """The LoRAs to apply with their strengths, in row order; in a row, a dropped file wins over a picked run."""
    loras = []
    for row in range(1, MAX_LORAS + 1):
        gen_run, gen_upload, strength = (rows.get(name) for name in row_names(row))
        strength = 1.0 if strength is None else float(strength)
        if gen_upload:
            loras.append((Path(gen_upload), strength))
        elif gen_run:
            run = ctx.folders.run(gen_run, visitor)
            if not run.diffusers_lora.is_file():
                raise LoraGuiError(f"the run {gen_run} has no LoRA file yet: wait for it to finish, or pick another")
            loras.append((run.diffusers_lora, strength))
    if not loras:
        raise LoraGuiError("pick a run you trained, or upload a LoRA file, first")
    return loras
