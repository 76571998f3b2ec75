"""Issue 28's Train tab as a newcomer meets it: honest times on this machine, settings that follow the base model,
plain help texts, one loud button, no dead ends on a taken run name, and messages that go when they are stale."""

from __future__ import annotations

import html

import pytest

from lora_gui.config import TrainConfig
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE
from lora_gui.ui import config_form
from lora_gui.ui.app import CSS, build_app
from lora_gui.ui.model_choices import TINY_CHOICE, TINY_CHOICES
from lora_gui.ui.train_settings import show_token_box, suggest_settings


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    demo, ctx = build_app(tmp_path_factory.mktemp("runs"), JobManager())
    return demo, ctx


@pytest.mark.app
def test_start_is_the_one_loud_button_and_stop_is_off_while_nothing_trains(built):
    _, ctx = built
    assert ctx["start"].variant == "primary"
    assert ctx["stop"].variant == "secondary" and not ctx["stop"].interactive
    for name in ("suggest", "load_preset", "save_preset"):
        assert ctx[name].variant not in ("primary", "stop"), name


@pytest.mark.app
def test_the_token_box_shows_only_for_a_model_that_may_need_a_token(built, tmp_path):
    _, ctx = built
    assert ctx["hf_token"].visible is False, "the demo model downloads nothing"
    shown = {
        choice: show_token_box(ctx, base_model=choice)["hf_token"]["visible"]
        for choice in (TINY_CHOICE, "black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-xl-base-1.0")
    }
    assert shown == {
        TINY_CHOICE: False,
        "black-forest-labs/FLUX.1-dev": True,
        "stabilityai/stable-diffusion-xl-base-1.0": False,
    }
    assert show_token_box(ctx, base_model="someone/private-model")["hf_token"]["visible"], "it may be gated"
    assert not show_token_box(ctx, base_model=str(tmp_path))["hf_token"]["visible"], "a folder here needs none"


@pytest.mark.app
def test_what_the_pictures_are_of_starts_unanswered(built):
    _, ctx = built
    assert ctx["subject"].value is None
    settings = config_form.widget_values(TrainConfig())
    answer = suggest_settings(ctx, EVERYONE, session="", base_model=TINY_CHOICE, subject=None, **settings)
    assert "Say first what the pictures are of" in html.unescape(answer["suggestions"])


@pytest.mark.app
def test_previews_are_drawn_large_without_smoothing(built):
    _, ctx = built
    assert "lg-previews" in ctx["samples"].elem_classes and ctx["samples"].columns <= 2
    assert ".lg-previews img { image-rendering: pixelated; }" in CSS
    assert "min-width: 256px" in CSS.split(".lg-previews .thumbnail-item", 1)[1].split("}")[0]


def staged_pictures(ctx, tmp_path) -> str:
    """A few pictures staged as the Dataset tab stages dropped ones; the session's id."""
    from lora_gui.demo import write_demo_dataset
    from lora_gui.staging import Staging

    staging = Staging.for_session(ctx.runs_dir, "", EVERYONE)
    staging.import_folder(write_demo_dataset(tmp_path / "pictures", count=4, size=(64, 64)))
    return staging.session_id


@pytest.mark.app
def test_a_reloaded_page_and_start_never_end_on_a_taken_run_name(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lora_gui.ui.app import restore
    from lora_gui.ui.train_tab import start

    _, ctx = build_app(tmp_path / "runs", JobManager())
    (ctx.runs_dir / "my-lora-1").mkdir()
    # A page opened after that run started: its box and the page's restore both name a free run.
    name_now = ctx["run_name"].load_event_to_attach[0]
    assert name_now() == "my-lora-2"
    restored = restore(ctx, EVERYONE, "", "", {}, 0, 64, "")
    assert restored["run_name"] == "my-lora-2"

    # Start with the taken name (a page that kept it): the run goes ahead under a free one, and says so.
    submitted = []

    def submit_new(config, folder, pictures, **kwargs):
        folder.mkdir()
        submitted.append(folder.name)
        return SimpleNamespace(job_id=7, run=SimpleNamespace(name=folder.name))

    monkeypatch.setattr(ctx.engine.jobs, "submit_new", submit_new)
    monkeypatch.setattr(ctx.engine.jobs, "queue_position", lambda job_id: 0)
    session = staged_pictures(ctx, tmp_path)
    settings = {**config_form.widget_values(TrainConfig()), "resolution": 64}
    answer = start(ctx, EVERYONE, session=session, run_name="my-lora-1", base_model=TINY_CHOICE, **settings)
    assert submitted == ["my-lora-2"]
    assert "A run named my-lora-1 exists already, so this one is named my-lora-2" in html.unescape(
        answer["train_notice"]
    )
    assert answer["run_name"] == "my-lora-3"
    (ctx.runs_dir / "cat").mkdir()
    start(ctx, EVERYONE, session=session, run_name="cat", base_model=TINY_CHOICE, **settings)
    assert submitted[-1] == "cat-2"


def inside(component, kind) -> bool:
    """Whether `component` is laid out inside a block of `kind` (an Accordion, a Row)."""
    block = component.parent
    while block is not None:
        if isinstance(block, kind):
            return True
        block = block.parent
    return False


@pytest.mark.app
def test_the_trigger_word_shows_beside_the_subject_and_says_to_use_it_in_prompts(built):
    import gradio as gr

    _, ctx = built
    trigger = ctx["trigger_word"]
    assert not inside(trigger, gr.Accordion), "a newcomer never opens Advanced settings"
    assert trigger.parent is ctx["subject"].parent
    assert "in front of every caption" in trigger.info and "prompts" in trigger.info


@pytest.mark.app
def test_preset_menu_entries_fit_their_box_and_the_whole_description_shows_under_it(built):
    from lora_gui.config import list_presets
    from lora_gui.ui.presets import describe_preset, preset_choices

    _, ctx = built
    assert all(len(entry) <= 64 for entry, _ in preset_choices()), preset_choices()
    described = describe_preset(ctx, preset="flux-dev-12gb")["preset"]["info"]
    assert list_presets()["flux-dev-12gb"] in described


@pytest.mark.app
def test_the_estimate_is_redone_when_any_setting_changes(built):
    demo, ctx = built
    (estimating,) = [dependency for dependency in demo.config["dependencies"] if dependency["api_name"] == "estimate"]
    watched = {target for target, _ in estimating["targets"]}
    # A setting out of range shows in the estimate ("must be between 0 and 0.5 (got 10)"): fixing it redoes it.
    for name in ("caption_dropout", "resolution", "learning_rate", "sample_every"):
        assert ctx[name]._id in watched, name


def job_that(tmp_path, status: str, **state):
    """A run of the visitor's, as the Train tab's poll reads it."""
    from types import SimpleNamespace

    from lora_gui.jobs import JobState

    snapshot = JobState(job_id=3, run_name="my-lora-1", run_dir=str(tmp_path), status=status, **state)
    return SimpleNamespace(job_id=3, owner="", snapshot=lambda: snapshot, config=TrainConfig(), run=None)


@pytest.mark.app
def test_a_stale_notice_goes_once_the_run_trains_or_ends(built, tmp_path, monkeypatch):
    from lora_gui import runs
    from lora_gui.ui.common import notice
    from lora_gui.ui.train_live import poll

    _, ctx = built
    error = notice("there are no usable pictures yet", "error")
    started = notice("Training my-lora-1 started.")
    running = job_that(tmp_path, runs.RUNNING, step=3, total_steps=10)
    monkeypatch.setattr(ctx.engine.jobs, "latest", lambda visitor: running)
    assert poll(ctx, EVERYONE, None, {}, error)["train_notice"] == "", "an earlier try's error"
    assert "train_notice" not in poll(ctx, EVERYONE, None, {}, started), "still true while it trains"
    failed = job_that(tmp_path, runs.FAILED, error="out of memory")
    monkeypatch.setattr(ctx.engine.jobs, "latest", lambda visitor: failed)
    ended = poll(ctx, EVERYONE, None, {"job": 3, "status": runs.RUNNING}, started)
    assert ended["train_notice"] == "" and "failed" in ended["progress"], "'started' above 'failed'"


@pytest.mark.app
def test_with_pictures_in_and_nothing_trained_the_next_step_is_start(tmp_path):
    from lora_gui.ui.train_live import idle_progress

    _, ctx = build_app(tmp_path / "runs", JobManager())
    assert "Add pictures in the Dataset tab" in idle_progress(ctx, EVERYONE, "", None)["progress"]
    session = staged_pictures(ctx, tmp_path)
    progress = html.unescape(idle_progress(ctx, EVERYONE, session, None)["progress"])
    assert "Your 4 pictures are ready: press Start training" in progress and "Add pictures" not in progress


@pytest.mark.app
def test_a_fresh_page_holds_the_demo_models_own_settings_and_a_rate_hint_that_matches_them(built):
    from lora_gui.demo import demo_config

    _, ctx = built
    demo = demo_config()
    assert ctx["base_model"].value == TINY_CHOICE
    assert (ctx["resolution"].value, ctx["max_steps"].value) == (demo.resolution, demo.max_steps) == (64, 250)
    assert ctx["learning_rate"].value == 0.003
    assert "1e-4 is a safe start" not in ctx["learning_rate"].info and "0.003" in ctx["learning_rate"].info


@pytest.mark.app
def test_picking_a_base_model_sets_the_size_it_was_made_for(built):
    from lora_gui.ui.train_settings import settings_for_model

    _, ctx = built
    form = {name: ctx[name].value for name in config_form.field_names()}
    sdxl = settings_for_model(ctx, base_model="stabilityai/stable-diffusion-xl-base-1.0", **form)
    assert sdxl["resolution"] == 1024 and sdxl["max_steps"] == TrainConfig().max_steps
    assert sdxl["learning_rate"]["value"] == 1e-4, "the demo's rate would wreck a real model"
    assert "1e-4" in sdxl["learning_rate"]["info"] and "0.003" not in sdxl["learning_rate"]["info"]
    sd15 = settings_for_model(ctx, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", **{**form, **sdxl})
    assert sd15["resolution"] == 512
    back = settings_for_model(ctx, base_model=TINY_CHOICE, **{**form, **sdxl})
    assert (back["resolution"], back["max_steps"], back["learning_rate"]["value"]) == (64, 250, 0.003)
    assert settings_for_model(ctx, base_model="someone/not-downloaded", **form) == {}, "its family is not known yet"


@pytest.mark.app
def test_picking_a_model_that_trains_its_denoiser_alone_turns_the_text_encoder_off(built):
    """The page starts with the demo's settings, which teach the demo model's text encoder too; Flux, Z-Image and
    klein train their transformer alone, and a run asked for more would fail: picking one turns it off."""
    from lora_gui.ui.train_settings import settings_for_model

    _, ctx = built
    form = {name: ctx[name].value for name in config_form.field_names()}
    assert form["train_text_encoder"], "the demo's settings train the demo model's text encoder"
    changed = {**form, "learning_rate": 3e-4}  # the visitor's own rate: the form is no longer the quick settings
    transformers = [choice for choice, family in TINY_CHOICES.items() if family in ("flux", "zimage", "flux2-klein")]
    for choice in ["black-forest-labs/FLUX.1-dev", *transformers]:
        assert settings_for_model(ctx, base_model=choice, **changed)["train_text_encoder"] is False, choice
    sdxl = settings_for_model(ctx, base_model="stabilityai/stable-diffusion-xl-base-1.0", **changed)
    assert sdxl["train_text_encoder"] is True, "SDXL trains its text encoders: the visitor's choice stays"
    # Should a run be refused all the same (a caller of the API), the page names the setting as the form does.
    assert "turn off 'Train text encoder'" in config_form.labelled("alone: turn off train_text_encoder")


@pytest.mark.app
def test_without_a_gpu_the_estimate_gives_a_rough_time_on_this_processor(built, monkeypatch):
    import torch

    from lora_gui.ui.train_settings import show_estimate

    _, ctx = built
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the processor BENCHMARKS.md measured
    form = {name: ctx[name].value for name in config_form.field_names()}
    demo = html.unescape(show_estimate(ctx, base_model=TINY_CHOICE, **form)["estimate"])
    assert "On this computer's processor: about 22 s (rough" in demo
    slow = html.unescape(
        show_estimate(ctx, base_model=TINY_CHOICE, **{**form, "resolution": 512, "max_steps": 1000, "batch_size": 1})[
            "estimate"
        ]
    )
    assert "about 47 min" in slow, "the issue's fresh page (512 px, 1000 steps) measured about 90 minutes"
    real = {**config_form.widget_values(TrainConfig()), "family": "sd15"}
    sd15 = html.unescape(show_estimate(ctx, base_model="someone/model", **real)["estimate"])
    assert "no NVIDIA GPU" in sd15 and "On this computer's processor: about 2.3 h (rough" in sd15


@pytest.mark.app
def test_suggest_settings_knows_the_demo_model_and_that_there_is_no_gpu(tmp_path):
    from lora_gui.ui.train_settings import suggest_settings

    _, ctx = build_app(tmp_path / "runs", JobManager())
    session = staged_pictures(ctx, tmp_path)
    form = {**config_form.widget_values(TrainConfig()), "trigger_word": "zqx"}
    demo = suggest_settings(ctx, EVERYONE, session=session, base_model=TINY_CHOICE, subject="object", **form)
    assert (demo["resolution"], demo["max_steps"], demo["trigger_word"]) == (64, 250, "zqx")
    assert "24 GB card" not in demo["suggestions"] and "about 22 s" in html.unescape(demo["suggestions"])
    real = suggest_settings(
        ctx, EVERYONE, session=session, base_model="someone/model", subject="object", **{**form, "family": "sd15"}
    )
    said = html.unescape(real["suggestions"])
    assert "24 GB card" not in said and "these settings are for this computer's processor" in said
    assert "On this computer's processor: about" in said


JARGON = ("optimizer step", "UNet", "bf16", "NF4", "Min-SNR", "max_steps", "to_q", "capacity", "1e+0", "''")


@pytest.mark.app
def test_every_train_setting_says_in_plain_words_what_it_changes(built):
    import dataclasses

    import gradio as gr

    from lora_gui.ui.config_form import advanced_groups, label

    _, ctx = built
    for field in dataclasses.fields(TrainConfig):
        said = TrainConfig.help(field.name)
        assert not [word for word in JARGON if word in said], (field.name, said)
        assert len(said.split()) >= 6, f"{field.name}: a help that only repeats its label ({said!r})"
    for name in config_form.field_names():
        shown = f"{label(name)} {ctx[name].info}"
        assert not [word for word in JARGON if word in shown], (name, shown)
    # Advanced settings come under headings, each setting once.
    for title, names in advanced_groups().items():
        for name in names:
            group = ctx[name].parent
            while not isinstance(group, gr.Column):
                group = group.parent
            assert "lg-settings-group" in group.elem_classes and title in group.children[0].value, (name, title)


@pytest.mark.unit
def test_a_setting_out_of_range_is_named_by_its_label_with_a_range_a_person_reads():
    from lora_gui.errors import LoraGuiError

    form = config_form.widget_values(TrainConfig())
    with pytest.raises(LoraGuiError) as steps:
        config_form.config_from_values({**form, "max_steps": 0, "base_model": ""})
    assert str(steps.value) == "'Steps' must be 1 or more (got 0)"
    with pytest.raises(LoraGuiError) as seed:
        config_form.config_from_values({**form, "seed": 2**33, "base_model": ""})
    assert "'Seed' must be between 0 and 4,294,967,295 (got 8,589,934,592)" in str(seed.value)


@pytest.mark.unit
def test_a_long_time_is_said_in_days():
    from lora_gui.estimate import duration

    assert [duration(40), duration(3200), duration(8280), duration(252 * 3600)] == [
        "40 s",
        "54 min",
        "2.3 h",
        "10 days",
    ]


@pytest.mark.app
def test_the_rate_hint_follows_whatever_set_the_rate(built):
    from lora_gui.ui.train_settings import rate_hint

    demo, ctx = built
    following = [
        dependency
        for dependency in demo.config["dependencies"]
        if (ctx["learning_rate"]._id, "change") in [tuple(target) for target in dependency["targets"]]
        and [ctx["learning_rate"]._id] == dependency["outputs"]
    ]
    assert following, "a preset, the demo or Suggest setting the rate redoes its hint"
    assert (
        "0.002 is far above the usual"
        in rate_hint(ctx, optimizer="adamw", learning_rate=0.002)["learning_rate"]["info"]
    )
    assert "1e-4 is a safe start" in rate_hint(ctx, optimizer="adamw", learning_rate=1e-4)["learning_rate"]["info"]
