"""A Space's quotas, tried as a stranger would: many sessions of one script, caption edits that grow, Try the demo
pressed again and again, and Gradio's own upload route. `python app.py` runs as a Space (SPACE_ID set) with small
quotas. Each test is a row of the table in issue 27."""

from __future__ import annotations

import contextlib
import http.client
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from helpers.app import QUICK, SPACE, AppServer, running_app, text, upload_pictures

from lora_gui import data
from lora_gui.demo import write_demo_dataset
from lora_gui.owners import anonymous, read_owner
from lora_gui.staging import STAGING_DIR

pytestmark = pytest.mark.app

# The Space tests' server with smaller quotas, so a few small pictures reach them.
LIMITS = {
    **SPACE,
    "LORA_GUI_MAX_STAGING_MB": "2",
    "LORA_GUI_MAX_FILES": "20",
    "LORA_GUI_MAX_QUEUED_RUNS": "2",
    "LORA_GUI_MAX_UPLOADS_MB": "10",
}


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    uploads = tmp_path_factory.mktemp("gradio-uploads")  # Gradio's upload folder, this server's alone
    env = {**LIMITS, "GRADIO_TEMP_DIR": str(uploads)}
    with running_app(tmp_path_factory.mktemp("space-runs"), "space-limits-server.log", env=env) as server:
        server.uploads = uploads  # type: ignore[attr-defined]
        yield server


def visitor_with_pictures(space: AppServer, folder: Path, count: int = 2) -> Client:
    """A new visitor (a gradio_client of their own: a session of their own) with `count` small captioned pictures."""
    client = Client(space.url, verbose=False)
    write_demo_dataset(folder, count=count, size=(64, 64))
    assert f"Added {count} pictures" in upload_pictures(client, folder)
    return client


def staged_by(space: AppServer, client: Client) -> tuple[int, int]:
    """Bytes and pictures in every staging folder of the visitor `client` is (an API client's id is its session's)."""
    owner = anonymous(f"session:{client.session_hash}")
    folders = [path for path in (space.runs_dir / STAGING_DIR).iterdir() if read_owner(path) == owner]
    files = [
        path for folder in folders for path in folder.rglob("*") if path.is_file() and ".thumbnails" not in path.parts
    ]
    return sum(path.stat().st_size for path in files), sum(path.suffix in data.ALL_IMAGE_SUFFIXES for path in files)


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


def test_find_and_replace_can_not_grow_captions_past_the_quota(space, tmp_path):
    client = visitor_with_pictures(space, tmp_path)
    answers = []
    for _ in range(14):  # each doubles every caption: 4 kB would be 64 MB
        answers.append(text(client.predict(find=" ", replace_with="  x ", api_name="/replace")))
        answers.append(text(client.predict(find="x", replace_with="xx", api_name="/replace")))
    used, _ = staged_by(space, client)
    assert used < 2_000_000
    assert any("a caption may have at most 4,000" in answer for answer in answers)


def test_a_caption_file_matched_to_a_staged_picture_is_checked_too(space, tmp_path):
    client = visitor_with_pictures(space, tmp_path / "pictures")
    (picture, *_) = sorted((tmp_path / "pictures").glob("*.png"))
    caption = tmp_path / f"{picture.stem}.txt"
    caption.write_text("word " * 200_000)  # 1 MB of caption for a picture already staged
    answer = text(client.predict(upload=[handle_file(str(caption))], api_name="/upload"))
    assert caption.name in answer and "a caption may have at most 4,000" in answer
    used, _ = staged_by(space, client)
    assert used < 100_000


def test_try_the_demo_again_and_again_keeps_to_the_visitors_picture_quota(space, tmp_path):
    client = visitor_with_pictures(space, tmp_path / "some", count=6)
    answers = [text(client.predict(api_name="/try_demo")) for _ in range(4)]  # 8 pictures, in one demo folder
    assert staged_by(space, client)[1] == 14 and all("Demo ready" in answer for answer in answers)
    client = visitor_with_pictures(space, tmp_path / "many", count=14)
    answers = [text(client.predict(api_name="/try_demo")) for _ in range(2)]  # 14 + 8 over the 20 allowed
    assert staged_by(space, client)[1] == 14  # the demo comes whole or not at all; the visitor's own are kept
    assert "this server keeps at most 20 pictures" in answers[-1]


def test_bulk_caption_edits_with_an_empty_value_are_answered_in_a_sentence(space, tmp_path):
    client = visitor_with_pictures(space, tmp_path)
    for value in ("", None):
        assert "Type the trigger word first" in text(client.predict(trigger=value, api_name="/add_trigger"))
        assert "Type the caption to use" in text(client.predict(fill_caption=value, api_name="/fill_empty"))


def raw_upload(space: AppServer, content: bytes) -> tuple[int, str]:
    """POST one file to Gradio's upload route as a script would, no event after it: the status and the answer."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="junk.png"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            content,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    address = urllib.parse.urlsplit(space.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    # Refused before the upload was read, the connection closes under the rest of it: the answer is still there.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        connection.request("POST", "/gradio_api/upload", body, headers)
    try:
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_raw_uploads_to_gradios_route_can_not_fill_its_folder(space):
    answers = [raw_upload(space, os.urandom(2_000_000)) for _ in range(10)]  # 20 MB against 10 MB
    held = sum(path.stat().st_size for path in space.uploads.rglob("*") if path.is_file())
    assert held < 12_000_000  # the 10 MB, and at most the one upload that found room just under it
    assert answers[0][0] == 200
    assert (429, "The server holds as many uploads as it can right now; try again in a few minutes.") in answers
