"""Issue 28's Generate and Runs rows, at the handlers: the prompt a LoRA answers to, pictures drawn large, step
progress while generating, a run opened from its row, words that follow the state."""

from __future__ import annotations

import dataclasses
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
    assert "This LoRA answers to ohwx; keep it in the prompt." in picked["gen_trigger_note"]["value"]

    # Another run picked: the prompt the last pick filled in is replaced; one the visitor typed is kept.
    made_run(ctx.runs_dir, "sks-run", trigger="sks", caption="a dog")
    again = pick_run(ctx, EVERYONE, picked["prompt"], picked["gen_auto_prompt"], gen_run_1="sks-run")
    assert again["prompt"] == "sks, a dog" and "answers to sks" in again["gen_trigger_note"]["value"]
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


# ---- row 6: the Runs tab -------------------------------------------------------------------------------------------
@pytest.mark.app
def test_clicking_a_row_of_the_runs_table_opens_that_run(tmp_path):
    from types import SimpleNamespace

    from lora_gui.ui.runs import open_row

    demo, ctx = build_app(tmp_path, JobManager())
    clicked = SimpleNamespace(row_value=["my-lora-2", "2026-12-06 22:40", "4 of 4", "0.1", "finished"], index=[1, 3])
    assert open_row(clicked) == "my-lora-2"  # the row's run, whichever cell was clicked
    table, menu = ctx["runs_table"]._id, ctx["run_pick"]._id
    wired = [dependency for dependency in demo.config["dependencies"] if (table, "select") in dependency["targets"]]
    assert [dependency["outputs"] for dependency in wired] == [[menu]]


@pytest.mark.app
def test_opening_a_run_clears_what_was_said_about_the_last_one(ctx, monkeypatch):
    from huggingface_hub import constants

    from lora_gui.ui.runs import ABOUT_A_RUN, open_run

    made_run(ctx.runs_dir, "good-run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    opened = open_run(ctx, EVERYONE, "good-run")
    assert all(opened[name] == "" for name in ABOUT_A_RUN)
    assert {"runs_notice", "hub_notice", "tools_notice", "run_export_notice"} <= set(ABOUT_A_RUN)
    assert not opened["confirm_row"]["visible"]
    assert all(opened[box]["visible"] for box in ("run_export_box", "run_tools_box", "run_push_box"))


@pytest.mark.app
def test_a_failed_run_offers_no_lora_file_and_no_answer_names_a_server_path(ctx):
    from lora_gui.ui.runs import export, merge, open_run, push, resize

    path = made_run(ctx.runs_dir, "failed-run", lora=False)
    RunFolder(path).write_status(runs.FAILED, created=time.time(), step=0, total_steps=4, message="It broke.")
    opened = open_run(ctx, EVERYONE, "failed-run")
    assert not any(opened[box]["visible"] for box in ("run_export_box", "run_tools_box", "run_push_box"))
    assert "saved no LoRA file" in opened["run_info"]
    answers = [
        export(ctx, EVERYONE, "failed-run", "kohya")["run_export_notice"],
        resize(ctx, EVERYONE, "failed-run", 2)["tools_notice"],
        merge(ctx, EVERYONE, "failed-run", [], None, 1, 1, 0)["tools_notice"],
        push(ctx, EVERYONE, "failed-run", "me/x", "hf_x", True)["hub_notice"],
    ]
    for answer in answers:
        assert "The run failed-run saved no LoRA file" in answer and str(ctx.runs_dir) not in answer, answer


@pytest.mark.app
def test_resume_takes_the_visitor_to_the_train_tab(ctx, monkeypatch):
    from types import SimpleNamespace

    from lora_gui.ui.runs import resume_run

    made_run(ctx.runs_dir, "stopped-run")
    monkeypatch.setattr(ctx.engine.jobs, "resume", lambda path, hub_token=None: SimpleNamespace(job_id=7))
    resumed = resume_run(ctx, EVERYONE, "stopped-run")
    assert resumed["train_job"] == 7 and resumed["tabs"].selected == "train"


@pytest.mark.app
def test_the_hub_token_box_shows_only_where_pushing_is_possible(ctx, monkeypatch):
    from huggingface_hub import constants

    from lora_gui.ui.runs import open_run

    made_run(ctx.runs_dir, "good-run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not open_run(ctx, EVERYONE, "good-run")["run_push_box"]["visible"], "offline: nothing can be pushed"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert open_run(ctx, EVERYONE, "good-run")["hub_token"]["visible"]
    signed_in = dataclasses.replace(EVERYONE, hub_token="hf_from_signing_in")
    assert not open_run(ctx, signed_in, "good-run")["hub_token"]["visible"], "signing in gave the token"
    assert "hf auth login" not in ctx["hub_token"].info
    assert "Leave it empty if this computer is already signed in to Hugging Face" in ctx["hub_token"].info


# ---- row 10: words in the order things happened, and words that follow the state -----------------------------------
@pytest.mark.app
def test_a_runs_info_tells_its_story_oldest_first(ctx):
    from lora_gui.ui.runs import open_run

    path = made_run(ctx.runs_dir, "failed-run", lora=False)
    RunFolder(path).write_status(runs.FAILED, created=time.time() - 3600, step=0, total_steps=4, message="It broke.")
    info = open_run(ctx, EVERYONE, "failed-run")["run_info"]
    assert "failed-run: started " in info and ", then failed " in info and " at step 0 of 4." in info
    assert info.index("started") < info.index("then failed") < info.index("It broke.")


@pytest.mark.app
def test_generate_says_what_to_do_first_from_where_the_visitor_is(ctx, tmp_path, monkeypatch):
    import threading
    from types import SimpleNamespace

    from lora_gui.demo import write_demo_concept
    from lora_gui.ui.generate import refresh_runs

    def opened(session: str = "") -> str:
        return refresh_runs(ctx, EVERYONE, None, None, "", "", session)["gen_notice"]

    assert "Nothing trained yet: add pictures in the Dataset tab" in opened()
    staging = ctx.folders.staging("", EVERYONE)
    staging.import_folder(write_demo_concept(tmp_path / "demo", count=8))
    assert "Train first in the Train tab: your 8 pictures are ready" in opened(staging.session_id)
    training = SimpleNamespace(done=threading.Event(), run=SimpleNamespace(name="my-lora-1"))
    monkeypatch.setattr(ctx.engine.jobs, "latest", lambda visitor: training)
    assert "my-lora-1 is training in the Train tab" in opened(staging.session_id)

    made_run(ctx.runs_dir, "my-lora-1", trigger="zqx")
    picked = refresh_runs(ctx, EVERYONE, None, None, "", "", staging.session_id)
    assert picked["gen_notice"] == "" and picked["gen_run_1"]["value"] == "my-lora-1", "a LoRA to try: no hint"


@pytest.mark.app
def test_generate_asks_for_a_hub_token_only_for_a_model_that_downloads(ctx, tiny_model):
    from lora_gui.ui.generate import pick_base_model, pick_run
    from lora_gui.ui.model_choices import TINY_CHOICE

    assert not ctx["gen_token_box"].visible and ctx["size"].value == 64, "a fresh page: the demo model, at 64 px"
    assert not pick_base_model(ctx, TINY_CHOICE)["gen_token_box"]["visible"]
    assert not pick_base_model(ctx, str(tiny_model))["gen_token_box"]["visible"], "a folder on this computer"
    assert pick_base_model(ctx, "black-forest-labs/FLUX.1-dev")["gen_token_box"]["visible"]
    made_run(ctx.runs_dir, "hub-run")  # trained on some/model, from the Hub
    assert pick_run(ctx, EVERYONE, "", "", gen_run_1="hub-run")["gen_token_box"]["visible"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("family", "programs"),
    [("sd15", "AUTOMATIC1111, Forge and ComfyUI"), ("flux", "Forge and ComfyUI"), ("zimage", "ComfyUI")],
)
def test_the_kohya_file_is_offered_for_the_programs_that_run_its_model(tmp_path, family, programs):
    """A Z-Image LoRA is not for AUTOMATIC1111: the page names the programs that run the run's model."""
    from lora_gui.ui.common import loads_in

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    TrainingRecord.now(family, "flow", "some/model", 4, 4, 1.0, 1.0, []).save(run.lora_info)
    assert loads_in(run.path, "kohya") == programs
    assert loads_in(run.path, "diffusers") == "diffusers (Python)"
    assert loads_in(tmp_path / "saved-before-records", "kohya").startswith("AUTOMATIC1111 (Stable Diffusion)")
