"""A Space's quotas, tried as a stranger would: many sessions of one script, caption edits that grow, Try the demo
pressed again and again, and Gradio's own upload route. `python app.py` runs as a Space (SPACE_ID set) with small
quotas. Each test is a row of the table in issue 27."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client
from helpers.app import QUICK, AppServer, running_app, text, upload_pictures

from lora_gui.demo import write_demo_dataset

pytestmark = pytest.mark.app

SPACE = {
    "SPACE_ID": "someone/lora-trainer",
    "LORA_GUI_MAX_STAGING_MB": "2",
    "LORA_GUI_MAX_FILES": "20",
    "LORA_GUI_MAX_FILE_MB": "8",
    "LORA_GUI_MAX_RUNS_PER_VISITOR": "1",
    "LORA_GUI_MAX_QUEUED_RUNS": "2",
    "LORA_GUI_MIN_FREE_GB": "0",
}


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with running_app(tmp_path_factory.mktemp("space-runs"), "space-limits-server.log", env=SPACE) as server:
        yield server


def visitor_with_pictures(space: AppServer, folder: Path, count: int = 2) -> Client:
    """A new visitor (a gradio_client of their own: a session of their own) with `count` small captioned pictures."""
    client = Client(space.url, verbose=False)
    write_demo_dataset(folder, count=count, size=(64, 64))
    assert f"Added {count} pictures" in upload_pictures(client, folder)
    return client


def test_sessions_of_one_script_are_bounded_by_the_cap_on_the_whole_queue(space, tmp_path):
    started = []
    answers = []
    for number in range(3):  # each Client is a new session, so a new anonymous visitor
        client = visitor_with_pictures(space, tmp_path / str(number))
        answers.append(text(client.predict(run_name=f"spun-{number}", max_steps=5000, **QUICK, api_name="/start")))
        started.append(client)
    try:
        assert "Training spun-0 started" in answers[0] and "queued as number 1" in answers[1]
        assert "the queue is full" in answers[2].lower() and "at most 2 runs" in answers[2]
        assert not (space.runs_dir / "spun-2").exists()
    finally:
        for client in started:
            client.predict(api_name="/stop")


def test_bulk_caption_edits_with_an_empty_value_are_answered_in_a_sentence(space, tmp_path):
    client = visitor_with_pictures(space, tmp_path)
    for value in ("", None):
        assert "Type the trigger word first" in text(client.predict(trigger=value, api_name="/add_trigger"))
        assert "Type the caption to use" in text(client.predict(fill_caption=value, api_name="/fill_empty"))
