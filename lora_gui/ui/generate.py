"""The Generate tab: the base model's picture and the LoRA's picture, side by side, from one seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from lora_gui import runs
from lora_gui.config import TrainConfig
from lora_gui.errors import LoraGuiError
from lora_gui.ui.common import TINY_CHOICE, Ctx, error_notice, notice


def build_generate_tab(ctx: Ctx) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown(
        "**Step 3: try your LoRA.** The same prompt and seed make two pictures: one by the base model alone, "
        "one with your LoRA, so you see exactly what it changed."
    )
    with gr.Row(equal_height=True):
        c["gen_run"] = gr.Dropdown(
            choices=lora_runs(ctx),
            value=None,
            label="LoRA: a run you trained",
            info="Finished (or stopped) runs that saved a LoRA.",
            allow_custom_value=True,  # runs finished after the page was drawn; the handler checks the name
        )
        c["gen_upload"] = gr.File(
            label="…or upload a LoRA file (.safetensors)", file_types=[".safetensors"], height=100
        )
    c["gen_base_model"] = gr.Dropdown(
        choices=ctx.base_model_choices(),
        value=TINY_CHOICE,
        allow_custom_value=True,
        label="Base model",
        info="Use the one the LoRA was trained on; picking a run fills it in.",
    )
    c["prompt"] = gr.Textbox("", label="Prompt", placeholder="a photo of sks dog on the beach", lines=2)
    c["negative_prompt"] = gr.Textbox("", label="Negative prompt (what to avoid)", placeholder="blurry, low quality")
    with gr.Row(equal_height=True):
        c["gen_seed"] = gr.Number(0, precision=0, label="Seed", info="Same seed, same picture.")
        c["gen_steps"] = gr.Slider(1, 100, value=25, step=1, label="Steps", info="More is slower and finer.")
        c["guidance"] = gr.Slider(1, 15, value=7, step=0.5, label="Guidance", info="How closely to follow the prompt.")
        c["size"] = gr.Number(
            512, precision=0, label="Size (pixels)", info="Width and height; picking a run fills it in."
        )
    c["strength"] = gr.Slider(
        0, 2, value=1, step=0.05, label="LoRA strength", info="0 = no effect, 1 = as trained, above 1 = stronger."
    )
    c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate-button")
    c["gen_notice"] = gr.HTML()
    with gr.Row():
        c["base_image"] = gr.Image(label="Base model alone", interactive=False, elem_id="base-image")
        c["lora_image"] = gr.Image(label="With your LoRA", interactive=False, elem_id="lora-image")
    return c


def wire_generate_tab(ctx: Ctx) -> None:
    ctx.wire(
        ctx["gen_run"].input,
        pick_run,
        ["gen_run"],
        ["gen_base_model", "size", "prompt"],
        api_name="pick_run",
    )
    ctx.wire(
        ctx["generate"].click,
        generate,
        [
            "gen_run",
            "gen_upload",
            "gen_base_model",
            "prompt",
            "negative_prompt",
            "gen_seed",
            "gen_steps",
            "guidance",
            "size",
            "strength",
        ],
        ["base_image", "lora_image", "gen_notice"],
        api_name="generate",
    )
    ctx.wire(ctx["generate_tab"].select, refresh_runs, [], ["gen_run"], api_visibility="private")


def lora_runs(ctx: Ctx) -> list[str]:
    return [summary.name for summary in runs.list_runs(ctx.runs_dir) if summary.has_lora]


def refresh_runs(ctx: Ctx) -> dict[str, Any]:
    return {"gen_run": gr.update(choices=lora_runs(ctx))}


def pick_run(ctx: Ctx, gen_run: str | None) -> dict[str, Any]:
    """Fill in what the run was trained with: its base model, its size and a prompt it knows."""
    try:
        run = ctx.run_folder(gen_run or "")
        config = TrainConfig.load(run.config)
    except LoraGuiError:
        return {}
    captions = sorted(run.dataset.glob("*.txt"))
    prompt = config.sample_prompts[0] if config.sample_prompts else ""
    if not prompt and captions:
        prompt = captions[0].read_text(encoding="utf-8").strip()
    return {"gen_base_model": ctx.base_model_label(config.base_model), "size": config.resolution, "prompt": prompt}


def generate(
    ctx: Ctx,
    gen_run: str | None,
    gen_upload: str | None,
    gen_base_model: str,
    prompt: str,
    negative_prompt: str,
    gen_seed: float,
    gen_steps: float,
    guidance: float,
    size: float,
    strength: float,
) -> dict[str, Any]:
    try:
        loras = _chosen_loras(ctx, gen_run, gen_upload, strength)
        if not (prompt or "").strip():
            raise LoraGuiError("type a prompt first: describe the picture you want")
        if not size or not 64 <= size <= 2048:
            raise LoraGuiError("the size must be between 64 and 2048 pixels")
        generator = ctx.generators.get(ctx.resolve_base_model(gen_base_model))
        settings = dict(
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            seed=int(gen_seed or 0),
            steps=int(gen_steps),
            guidance=float(guidance),
            width=int(size) // 8 * 8,
            height=int(size) // 8 * 8,
        )
        generator.set_loras([])
        base = generator(**settings)
        generator.set_loras(loras)
        with_lora = generator(**settings)
    except LoraGuiError as error:
        return {"gen_notice": error_notice(error)}
    names = ", ".join(f"{_lora_name(path)} at strength {scale:g}" for path, scale in loras)
    made = f"Made with {names}, seed {settings['seed']}."
    if gen_base_model == TINY_CHOICE:
        made += " The tiny demo model is random, so its pictures look like coloured noise."
    return {
        "base_image": base,
        "lora_image": with_lora,
        "gen_notice": notice(made),
    }


def _lora_name(path: Path) -> str:
    return f"the LoRA of {path.parent.name}" if path.name == runs.DIFFUSERS_LORA else path.name


def _chosen_loras(ctx: Ctx, gen_run: str | None, gen_upload: str | None, strength: float) -> list[tuple[Path, float]]:
    """The LoRAs to apply with their strengths: an uploaded file wins over a picked run.

    A list, as Generator.set_loras takes, so several LoRAs with their own strengths can come later.
    """
    if gen_upload:
        return [(Path(gen_upload), float(strength))]
    if gen_run:
        run = ctx.run_folder(gen_run)
        if not run.diffusers_lora.is_file():
            raise LoraGuiError(f"the run {gen_run} has no LoRA file yet: wait for it to finish, or pick another")
        return [(run.diffusers_lora, float(strength))]
    raise LoraGuiError("pick a run you trained, or upload a LoRA file (.safetensors), first")
