"""Issue 28's Generate and Runs rows, at the handlers: the prompt a LoRA answers to, pictures drawn large, step
progress while generating, a run opened from its row, words that follow the state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lora_gui import runs
from lora_gui.config import TrainConfig
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE
from lora_gui.runs import RunFolder, TrainingRecord
from lora_gui.ui.app import build_app


def made_run(runs_dir: Path, name: str, trigger: str = "", caption: str = "a red circle", lora: bool = True) -> Path:
    """A run folder as training leaves it, without training: settings, one captioned picture, the LoRA's record and
    (with `lora`) a LoRA file that is never read here."""
    run = RunFolder(runs_dir / name)
    run.dataset.mkdir(parents=True)
    TrainConfig(base_model="some/model", resolution=64, trigger_word=trigger).save(run.config)
    (run.dataset / "a.txt").write_text(caption + "\n", encoding="utf-8")
    if lora:
        TrainingRecord.now("sd15", "epsilon", "some/model", 4, 4, 1.0, 1.0, []).save(run.lora_info)
        run.diffusers_lora.write_bytes(b"")
        run.write_status(runs.FINISHED, created=time.time(), step=4, total_steps=4)
    return run.path


@pytest.fixture
def ctx(tmp_path):
    return build_app(tmp_path, JobManager())[1]


# ---- row 3: Generate remembers what the LoRA answers to -------------------------------------------------------------
@pytest.mark.app
def test_picking_a_run_fills_the_prompt_with_its_trigger_word_and_says_so(ctx):
    from lora_gui.ui.generate import pick_run

    made_run(ctx.runs_dir, "ohwx-run", trigger="ohwx", caption="a red circle on a gray background")
    picked = pick_run(ctx, EVERYONE, "", "", gen_run_1="ohwx-run")
    assert picked["prompt"] == "ohwx, a red circle on a gray background"
    assert "This LoRA answers to ohwx; keep it in the prompt." in picked["gen_trigger_note"]

    # Another run picked: the prompt the last pick filled in is replaced; one the visitor typed is kept.
    made_run(ctx.runs_dir, "sks-run", trigger="sks", caption="a dog")
    again = pick_run(ctx, EVERYONE, picked["prompt"], picked["gen_auto_prompt"], gen_run_1="sks-run")
    assert again["prompt"] == "sks, a dog" and "answers to sks" in again["gen_trigger_note"]
    typed = pick_run(ctx, EVERYONE, "my own words", again["gen_auto_prompt"], gen_run_1="ohwx-run")
    assert "prompt" not in typed


@pytest.mark.unit
def test_the_demo_names_its_word_as_the_trigger_word():
    from lora_gui.demo import TRIGGER, demo_config

    assert demo_config().trigger_word == TRIGGER


# ---- row 4: small pictures drawn large, without smoothing ----------------------------------------------------------
@pytest.mark.app
def test_generated_pictures_and_previews_are_drawn_large_and_sharp(ctx):
    from lora_gui.ui.app import CSS
    from lora_gui.ui.generate import PIXELS

    for name in ("base_image", "lora_image", "run_samples"):
        assert PIXELS in ctx[name].elem_classes, name
    rule = next(line for line in CSS.splitlines() if line.startswith(f".{PIXELS} img"))
    assert "image-rendering: pixelated" in rule and "min-width: 256px" in rule


# ---- step progress while generating --------------------------------------------------------------------------------
class Progress:
    """Gradio's progress bar as a handler sees it, keeping what it was told."""

    def __init__(self):
        self.said: list[str] = []

    def __call__(self, fraction, desc=None, **kwargs):
        self.said.append(desc)


@pytest.mark.train
def test_generate_shows_each_pictures_steps(tiny_model, photos, tmp_path):
    from helpers.app import generate_request
    from helpers.runs import quick_config

    from lora_gui.training import train
    from lora_gui.ui.generate import generate

    lora = train(quick_config(tiny_model, photos, max_steps=1), tmp_path / "run")
    _, ctx = build_app(tmp_path / "runs", JobManager())
    progress = Progress()
    result = generate(ctx, EVERYONE, **{**generate_request(tiny_model, lora), "gen_steps": 3}, progress=progress)
    assert "Made with" in result["gen_notice"], result
    steps = [said for said in progress.said if said and "step" in said]
    # As many steps as the pipeline takes: the tiny model's scheduler (PNDM) takes one more than asked.
    total = len(steps) // 2
    assert total in (3, 4)
    pictures = ("With your LoRA", "Base model alone")  # in the order they are made
    assert steps == [f"{picture}: step {step} of {total}" for picture in pictures for step in range(1, total + 1)]
