"""Captioning in the app, through its API as the page calls it: pictures dropped without a single caption get
captions from the captioner (the tiny random tagger: offline, through the same code as the real ones), with the
trigger word in front, a caption the user typed kept unless they choose to replace them all, and the run then
trains to a LoRA with nobody typing a caption."""

from __future__ import annotations

import html

import pytest
from gradio_client import Client, handle_file
from helpers.app import QUICK, text, wait_until

from lora_gui.demo import write_demo_dataset
from lora_gui.staging import STAGING_DIR
from lora_gui.ui.captioning import TINY_CAPTIONER

pytestmark = pytest.mark.app


def staged_captions(runs_dir, session_pictures: set[str]) -> dict[str, str]:
    """The captions of the one staging folder holding these pictures, by picture name."""
    (folder,) = [
        folder
        for folder in (runs_dir / STAGING_DIR).iterdir()
        if {path.name for path in folder.glob("*.png")} == session_pictures
    ]
    return {name: (folder / name).with_suffix(".txt").read_text().strip() for name in session_pictures}


def test_pictures_without_captions_get_captions_and_train_to_a_lora(app_server, tmp_path):
    pictures = write_demo_dataset(tmp_path / "pictures", count=4, size=(64, 64))
    for caption in pictures.glob("*.txt"):
        caption.unlink()
    for picture in pictures.glob("*.png"):  # names no other test's staged pictures have, on the shared server
        picture.rename(picture.with_name(f"uncaptioned_{picture.name}"))
    names = {path.name for path in pictures.glob("*.png")}
    client = Client(app_server.url, verbose=False)
    added = text(client.predict(upload=[handle_file(str(p)) for p in sorted(pictures.iterdir())], api_name="/upload"))
    assert "4 without a caption" in added

    captioned = text(client.predict(captioner=TINY_CAPTIONER, trigger="zqx", api_name="/caption_empty"))
    assert "Captioned 4 pictures." in captioned and "without a caption" not in captioned
    captions = staged_captions(app_server.runs_dir, names)
    assert all(caption.startswith("zqx, ") and len(caption) > len("zqx, ") for caption in captions.values())

    # A caption the user typed stays through "caption the empty ones"; only "caption all" replaces it.
    client.predict(find=captions["uncaptioned_demo_00.png"], replace_with="my own words", api_name="/replace")
    assert "Every picture has a caption already" in text(
        client.predict(captioner=TINY_CAPTIONER, trigger="zqx", api_name="/caption_empty")
    )
    assert staged_captions(app_server.runs_dir, names)["uncaptioned_demo_00.png"] == "my own words"
    again = text(client.predict(captioner=TINY_CAPTIONER, trigger="zqx", api_name="/caption_all"))
    assert "Captioned 4 pictures." in again
    assert staged_captions(app_server.runs_dir, names)["uncaptioned_demo_00.png"].startswith("zqx, ")

    started = text(client.predict(run_name="captioned-for-me", max_steps=2, **QUICK, api_name="/start"))
    assert "Training captioned-for-me started" in started
    wait_until(client, "captioned-for-me</b> finished")
    assert (app_server.runs_dir / "captioned-for-me" / "captioned-for-me.safetensors").is_file()
    trained_on = (app_server.runs_dir / "captioned-for-me" / "dataset" / "uncaptioned_demo_01.txt").read_text()
    assert html.unescape(trained_on).startswith("zqx, ")


def test_captioning_with_nothing_to_caption_says_so(app_server):
    client = Client(app_server.url, verbose=False)
    answer = text(client.predict(captioner=TINY_CAPTIONER, trigger="", api_name="/caption_empty"))
    assert "Add pictures first" in answer
    assert "Nothing is being captioned" in text(client.predict(api_name="/stop_captioning"))
