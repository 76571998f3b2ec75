"""The Dataset tab and Try the demo as a newcomer meets them (issue 28): the visitor's own pictures are never thrown
away or mixed with the demo's, removing is asked first, captioning offline says what to do, a caption replaced can be
put back, and the loud buttons are the ones to press. The handlers are called as the page calls them."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from PIL import Image

from lora_gui import jobs
from lora_gui.config import TrainConfig
from lora_gui.demo import write_demo_dataset
from lora_gui.families import REGISTRY
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE
from lora_gui.staging import Staging
from lora_gui.ui import config_form
from lora_gui.ui.app import build_app, restore, try_demo, try_edit_demo
from lora_gui.ui.captioning import TINY_CAPTIONER
from lora_gui.ui.common import Ctx
from lora_gui.ui.dataset import add_before, add_folder, add_uploads, ask_clear, back_to_mine, clear, show_set
from lora_gui.ui.dataset_captions import caption_one, caption_pictures, captioner_choices, undo_caption
from lora_gui.ui.model_choices import TINY_CHOICE, TINY_CHOICES
from lora_gui.ui.train_tab import start

pytestmark = pytest.mark.app

CHECKS = dict(resolution=64, default_caption="")


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Ctx]:
    _, ctx = build_app(tmp_path / "runs", JobManager())
    try:
        yield ctx
    finally:
        ctx.engine.jobs.close()


def mine(ctx: Ctx, tmp_path: Path, count: int = 9) -> str:
    """The session of a visitor who added `count` captioned pictures of their own."""
    pictures = write_demo_dataset(tmp_path / "mine", count=count, size=(96, 96))
    added = add_folder(ctx, EVERYONE, folder=str(pictures), session="", dataset_version=0, **CHECKS)
    assert f"Added {count} pictures" in added["dataset_notice"]
    return added["session"]


def captions(ctx: Ctx, session: str) -> list[str]:
    staging = Staging.find(ctx.runs_dir, session)
    return [item.caption for item in staging.items()] if staging else []


def value(update: Any) -> Any:
    return update.get("value") if isinstance(update, dict) else update


def visible(update: Any) -> bool:
    return update.get("visible", True) if isinstance(update, dict) else True


def test_try_the_demo_keeps_the_visitors_pictures_and_one_button_goes_back(ctx, tmp_path):
    own = mine(ctx, tmp_path)
    before = captions(ctx, own)
    demo = try_demo(ctx, EVERYONE, session=own, dataset_version=1)
    assert demo["session"] != own and len(captions(ctx, demo["session"])) == 8
    assert "Your own 9 pictures are kept" in demo["dataset_notice"]
    assert captions(ctx, own) == before  # not a picture nor a caption of theirs touched, none of the demo's added
    shown = show_set(ctx, EVERYONE, session=demo["session"])
    assert visible(shown["demo_row"]) and visible(shown["back_to_mine"])
    assert value(shown["back_to_mine"]) == "Back to my pictures (9)"

    again = try_demo(ctx, EVERYONE, session=demo["session"], dataset_version=2)  # pressed twice: one demo set
    assert again["session"] == demo["session"] and len(captions(ctx, demo["session"])) == 8

    back = back_to_mine(ctx, EVERYONE, session=demo["session"], dataset_version=3, **CHECKS)
    assert back["session"] == back["remembered"] == own and captions(ctx, own) == before
    assert "Back to your 9 pictures" in back["dataset_notice"]
    assert Staging.find(ctx.runs_dir, demo["session"]) is None  # the demo's are put away: it draws them again
    assert not visible(show_set(ctx, EVERYONE, session=own)["demo_row"])


def test_try_an_edit_demo_puts_in_pairs_the_edit_model_and_its_settings_beside_the_visitors_pictures(
    ctx, tmp_path, monkeypatch
):
    own = mine(ctx, tmp_path)
    demo = try_edit_demo(ctx, EVERYONE, session=own, dataset_version=1)
    assert demo["session"] != own and "Your own 9 pictures are kept" in demo["dataset_notice"]
    assert "<b>16 edit pairs ready to train</b>" in demo["report"]
    assert TINY_CHOICES[demo["base_model"]] == "flux-kontext" and demo["preset"] == "tiny-cpu-edit-demo"
    assert demo["max_steps"] == 200 and demo["trigger_word"] == "zqx"
    trained = []
    monkeypatch.setattr(jobs, "train", lambda config, run_dir, **kwargs: trained.append(config))
    monkeypatch.setattr(ctx.models, "resolve", lambda choice, token: choice)  # the run is a stub: no model needed
    settings = {name: demo[name] for name in config_form.field_names()}
    started = start(
        ctx, EVERYONE, session=demo["session"], run_name="edit-demo", base_model=demo["base_model"], **settings
    )
    ctx.engine.jobs.wait(started["train_job"], timeout=30)
    run = ctx.runs_dir / "edit-demo"
    assert len(list((run / "control").iterdir())) == 16
    assert [config.control_data for config in trained] == [str((run / "control").resolve())]


def test_pictures_added_while_the_demo_is_shown_go_to_the_visitors_own(ctx, tmp_path):
    own = mine(ctx, tmp_path)
    demo = try_demo(ctx, EVERYONE, session=own, dataset_version=1)
    more = write_demo_dataset(tmp_path / "more", count=3, size=(80, 80))
    files = [str(path) for path in more.iterdir()]
    added = add_uploads(ctx, EVERYONE, upload=files, session=demo["session"], dataset_version=2, **CHECKS)
    assert added["session"] == added["remembered"] == own
    assert "Added 3 pictures" in added["dataset_notice"] and "went to your own pictures" in added["dataset_notice"]
    assert len(captions(ctx, own)) == 12 and not any("zqx" in caption for caption in captions(ctx, own))


def test_with_no_pictures_of_their_own_added_pictures_start_a_set_without_the_demos(ctx, tmp_path):
    demo = try_demo(ctx, EVERYONE, session="", dataset_version=0)
    assert "kept" not in demo["dataset_notice"]
    assert not visible(show_set(ctx, EVERYONE, session=demo["session"])["back_to_mine"])
    pictures = write_demo_dataset(tmp_path / "first", count=2, size=(80, 80))
    added = add_folder(ctx, EVERYONE, folder=str(pictures), session=demo["session"], dataset_version=1, **CHECKS)
    assert added["session"] != demo["session"] and len(captions(ctx, added["session"])) == 2


def test_after_a_reload_the_demos_pictures_still_lead_back_to_the_visitors_own(ctx, tmp_path):
    own = mine(ctx, tmp_path)
    demo = try_demo(ctx, EVERYONE, session=own, dataset_version=1)
    reloaded = restore(
        ctx, EVERYONE, owner_key="", remembered=demo["remembered"], my_presets={}, dataset_version=0, **CHECKS
    )
    assert reloaded["session"] == demo["session"]
    assert value(show_set(ctx, EVERYONE, session=reloaded["session"])["back_to_mine"]) == "Back to my pictures (9)"
    back = back_to_mine(ctx, EVERYONE, session=reloaded["session"], dataset_version=1, **CHECKS)
    assert back["session"] == own and len(captions(ctx, own)) == 9


def test_remove_all_is_beside_the_pictures_and_asks_first_saying_how_many(ctx, tmp_path):
    own = mine(ctx, tmp_path)
    ancestors, parent = [], ctx["clear"].parent
    while parent is not None:
        ancestors.append(parent)
        parent = parent.parent
    assert not any(isinstance(block, gr.Accordion) for block in ancestors)  # not hidden in the bulk edits
    assert visible(show_set(ctx, EVERYONE, session=own)["clear_row"])
    asked = ask_clear(ctx, EVERYONE, session=own)
    assert visible(asked["clear_confirm_row"])
    assert "Remove all 9 pictures and their captions?" in asked["clear_confirm_text"]
    assert len(captions(ctx, own)) == 9  # asking removed nothing
    removed = clear(ctx, EVERYONE, session=own, dataset_version=1, **CHECKS)
    assert captions(ctx, own) == [] and not visible(removed["clear_confirm_row"])
    assert not visible(show_set(ctx, EVERYONE, session=own)["clear_row"])


def test_offline_a_captioner_never_downloaded_says_in_plain_words_what_to_do_beside_its_buttons(
    ctx, tmp_path, download_cache
):
    own = mine(ctx, tmp_path, count=2)
    staging = Staging.find(ctx.runs_dir, own)
    staging.set_captions({picture.relpath: "" for picture in staging.items()})
    updates = list(
        caption_pictures(ctx, EVERYONE, "florence2-base", "", overwrite=False, session=own, dataset_version=1, **CHECKS)
    )
    said = updates[-1]["caption_notice"]  # the box right under the caption buttons
    for words in (
        "Florence-2 base must be downloaded once",
        "this computer is offline",
        "type the captions",
        "tiny random tagger",
    ):
        assert words in said
    assert "HF_HUB_OFFLINE" not in said

    first = staging.items()[0].relpath
    one = caption_one(
        ctx, EVERYONE, relpath=first, captioner="florence2-base", trigger="", session=own, dataset_version=2, **CHECKS
    )
    assert "caption_notice" not in one  # on the card of the picture, not far above it
    note = one["card_note"]
    assert note["relpath"] == first and note["version"] == one["dataset_version"]
    assert "must be downloaded once" in note["html"] and "HF_HUB_OFFLINE" not in note["html"]


def test_caption_it_on_a_captioned_picture_can_be_undone_and_says_the_tiny_taggers_tags_are_random(ctx, tmp_path):
    own = mine(ctx, tmp_path, count=2)
    staging = Staging.find(ctx.runs_dir, own)
    first = staging.items()[0].relpath
    good = staging.caption_of(first)
    assert good
    done = caption_one(
        ctx, EVERYONE, relpath=first, captioner=TINY_CAPTIONER, trigger="", session=own, dataset_version=1, **CHECKS
    )
    assert staging.caption_of(first) != good
    note = done["card_note"]
    assert note["relpath"] == first and note["previous"] == good
    assert "tags are random" in note["html"] and "Undo" in note["html"]
    undone = undo_caption(
        ctx, EVERYONE, relpath=first, previous=note["previous"], session=own, dataset_version=2, **CHECKS
    )
    assert staging.caption_of(first) == good and undone["dataset_version"] == 3
    assert "back" in undone["card_note"]["html"] and not undone["card_note"]["previous"]


def test_the_tiny_tagger_is_labelled_as_random_tags_for_trying_the_app_offline():
    (label,) = [label for label, name in captioner_choices() if name == TINY_CAPTIONER]
    assert "random tags" in label and "only for trying the app offline" in label


def test_the_loud_button_of_a_fresh_page_is_try_the_demo_and_stop_captioning_shows_only_while_captioning(ctx, tmp_path):
    assert ctx["try_demo"].variant == "primary"
    for quiet in ("caption_empty", "caption_all", "back_to_mine", "clear", "check_problems"):
        assert ctx[quiet].variant == "secondary", quiet
    assert not ctx["caption_stop"].visible  # nothing is being captioned
    own = mine(ctx, tmp_path, count=2)
    staging = Staging.find(ctx.runs_dir, own)
    staging.set_captions({picture.relpath: "" for picture in staging.items()})
    assert show_set(ctx, EVERYONE, session=own)["try_demo"]["variant"] == "secondary"  # pictures: quiet now

    updates = list(
        caption_pictures(ctx, EVERYONE, TINY_CAPTIONER, "", overwrite=False, session=own, dataset_version=1, **CHECKS)
    )
    assert visible(updates[0]["caption_stop"]) and not visible(updates[-1]["caption_stop"])
    assert "Captioned 2 pictures" in updates[-1]["caption_notice"]


def test_small_pictures_are_drawn_large_with_sharp_pixels_and_a_last_row_keeps_its_cards_narrow(ctx, tmp_path):
    from lora_gui.ui.app import CSS
    from lora_gui.ui.dataset import COLUMNS, PICTURE_HEIGHT, grid_rows, picture_classes

    small = Staging.find(ctx.runs_dir, try_demo(ctx, EVERYONE, session="", dataset_version=0)["session"]).items()
    assert all(picture_classes(item) == ["lg-pixelated"] for item in small)  # the demo's
    large = write_demo_dataset(tmp_path / "large", count=1, size=(512, 512))
    staged = add_folder(ctx, EVERYONE, folder=str(large), session="", dataset_version=0, **CHECKS)
    assert picture_classes(Staging.find(ctx.runs_dir, staged["session"]).items()[0]) == []
    assert PICTURE_HEIGHT >= 170
    assert ".lg-pixelated img {" in CSS and "image-rendering: pixelated" in CSS

    rows = grid_rows(small + small[:1])  # 9 pictures: a last row of one
    assert [len(row) for row in rows] == [COLUMNS] * 3
    assert rows[-1][1:] == [None] * (COLUMNS - 1)  # empty places beside the last card, which keeps its width


def test_dataset_messages_show_no_markup_as_text(ctx, tmp_path):
    own = mine(ctx, tmp_path)
    demo = try_demo(ctx, EVERYONE, session=own, dataset_version=1)
    said = [
        demo["dataset_notice"],
        demo["train_notice"],
        show_set(ctx, EVERYONE, session=demo["session"])["demo_text"],
        ask_clear(ctx, EVERYONE, session=demo["session"])["clear_confirm_text"],
        back_to_mine(ctx, EVERYONE, session=demo["session"], dataset_version=2, **CHECKS)["dataset_notice"],
    ]
    for message in said:
        assert "&lt;" not in message and "&gt;" not in message, message


def test_the_header_and_try_the_demo_promise_no_fixed_time_and_point_at_the_estimate(tmp_path):
    page, ctx = build_app(tmp_path / "runs", JobManager())
    try:
        (header,) = [
            block.value for block in page.blocks.values() if "# LoRA trainer" in str(getattr(block, "value", ""))
        ]
        demo = try_demo(ctx, EVERYONE, session="", dataset_version=0)
    finally:
        ctx.engine.jobs.close()
    assert "minute" not in header and "how long training takes on this computer" in header
    assert "minute" not in demo["train_notice"] and "shown above it" in demo["train_notice"]


def test_before_pictures_pair_by_name_the_checks_say_what_each_lacks_and_start_writes_the_runs_control(
    ctx, tmp_path, monkeypatch
):
    """Edit pairs as the page makes them: the after pictures dropped as any, the before pictures in their own drop
    area; the checks speak of pairs only once there are before pictures, and Start gives the run its control/ (hard
    links to the staged before pictures) with control_data set, while a run without them stays as it was."""
    after = write_demo_dataset(tmp_path / "after", count=4, size=(64, 64))
    before = tmp_path / "before"
    before.mkdir()
    for name in ("demo_00", "demo_01", "demo_02"):
        grey = Image.open(after / f"{name}.png").convert("L")
        (grey.resize((64, 48)) if name == "demo_02" else grey).save(before / f"{name}.jpg")
    Image.new("RGB", (64, 64)).save(before / "stray.png")
    added = add_uploads(
        ctx, EVERYONE, upload=sorted(map(str, after.iterdir())), session="", dataset_version=0, **CHECKS
    )
    assert "4 pictures ready to train" in added["report"] and "pair" not in added["report"]

    paired = add_before(
        ctx,
        EVERYONE,
        before_upload=sorted(map(str, before.iterdir())),
        session=added["session"],
        dataset_version=1,
        **CHECKS,
    )

    assert "Added 4 before pictures." in paired["dataset_notice"] and paired["before_upload"] is None
    report = paired["report"]
    assert "<b>3 edit pairs ready to train</b>, 64×64 pixels (the after pictures)." in report
    assert "<b>1 after picture has no before picture</b> (it is left out): demo_03.png." in report
    assert "<b>1 before picture has no after picture</b> of its name (not used): stray.png." in report
    assert (
        "<b>1 pair differs in shape</b>, so its before picture is stretched to the after picture's shape: "
        "demo_02.png: before 64x48, after 64x64." in report
    )
    trained = []
    monkeypatch.setattr(jobs, "train", lambda config, run_dir, **kwargs: trained.append(config))
    monkeypatch.setattr(ctx.models, "resolve", lambda choice, token: choice)  # no tiny model written: none trains
    settings = {**config_form.widget_values(TrainConfig()), "resolution": 64}
    editing = next(choice for choice, family in TINY_CHOICES.items() if not REGISTRY[family].trains_without_pairs)
    own = mine(ctx, tmp_path)
    for session, model, refused in (
        (paired["session"], TINY_CHOICE, "this base model makes pictures from text alone: pick an editing model"),
        (own, editing, "learns edits from before/after pairs: add each picture's before picture under Before"),
    ):
        answer = start(ctx, EVERYONE, session=session, run_name="refused", base_model=model, **settings)
        assert refused in html.unescape(answer["train_notice"])
    for session, model, run_name in ((paired["session"], editing, "pairs"), (own, TINY_CHOICE, "plain")):
        started = start(ctx, EVERYONE, session=session, run_name=run_name, base_model=model, **settings)
        ctx.engine.jobs.wait(started["train_job"], timeout=30)
    run, staged = ctx.runs_dir / "pairs", Staging.find(ctx.runs_dir, paired["session"])
    assert sorted(path.name for path in (run / "control").iterdir()) == ["demo_00.jpg", "demo_01.jpg", "demo_02.jpg"]
    assert (run / "control" / "demo_01.jpg").stat().st_ino == (staged.before_folder / "demo_01.jpg").stat().st_ino
    assert sorted(path.stem for path in (run / "dataset").glob("*.png")) == ["demo_00", "demo_01", "demo_02"]
    assert [config.control_data for config in trained] == [str((run / "control").resolve()), ""]
    assert not (ctx.runs_dir / "plain" / "control").exists() and not (ctx.runs_dir / "refused").exists()
