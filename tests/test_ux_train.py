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
from lora_gui.ui.model_choices import TINY_CHOICE
from lora_gui.ui.train_tab import show_token_box, suggest_settings


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
