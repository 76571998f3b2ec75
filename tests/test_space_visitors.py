"""A Space that strangers share, tried as an attacker would: visitor A trains, visitor B (a gradio_client of their
own, so a session of their own) calls every endpoint with A's run name, fetches A's files by URL, and sends raw
queue calls to the events the page hides. `python app.py` runs as a Space starts it (SPACE_ID set), with small
quotas. Each test is a row of the table in issue 14."""

from __future__ import annotations

import html
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client, handle_file
from helpers.app import QUICK, SPACE, AppServer, progress, raw_event, running_app, text, upload_pictures

from lora_gui.demo import write_demo_dataset
from lora_gui.staging import STAGING_DIR

pytestmark = pytest.mark.app

SECRET_PROMPT = "photo of my secret friend"
A_RUN = "a-private-run"


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with running_app(tmp_path_factory.mktemp("space-runs"), "space-server.log", env=SPACE) as server:
        yield server


@pytest.fixture(scope="module")
def a_training(space: AppServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Visitor A, training a long run on their pictures, with a preview already made."""
    a = Client(space.url, verbose=False)
    pictures = tmp_path_factory.mktemp("a-pictures")
    write_demo_dataset(pictures, count=4, size=(64, 64))
    assert "Added 4 pictures" in upload_pictures(a, pictures)
    settings = {**QUICK, "sample_every": 2, "sample_prompts": SECRET_PROMPT}
    started = text(a.predict(run_name=A_RUN, max_steps=5000, **settings, api_name="/start"))
    assert f"Training {A_RUN} started" in started
    yield SimpleNamespace(client=a, run=space.runs_dir / A_RUN, previews=wait_for_previews(a))
    a.predict(api_name="/stop")


def wait_for_previews(client: Client) -> list:
    """The previews the live view shows its visitor, once there are some (a poll leaves out what did not change)."""
    deadline = time.monotonic() + 300
    while True:
        previews = progress(client)[2]
        if isinstance(previews, list) and previews:
            return previews
        assert time.monotonic() < deadline, "the run made no preview"
        time.sleep(0.2)


def b_sees(result) -> str:
    return text(result)


def test_another_visitor_can_not_stop_delete_resume_push_or_export_a_run(space, a_training):
    b = Client(space.url, verbose=False)
    assert "Nothing is training right now" in b_sees(b.predict(api_name="/stop"))
    for endpoint, values in [
        ("/delete_run", {"run_pick": A_RUN}),
        ("/resume", {"run_pick": A_RUN}),
        ("/export", {"run_pick": A_RUN, "run_layout": "kohya"}),
        ("/push_to_hub", {"run_pick": A_RUN, "hub_repo": "b/stolen", "hub_token": "hf_b", "hub_private": True}),
        ("/open_run", {"run_pick": A_RUN}),
    ]:
        answer = b_sees(b.predict(**values, api_name=endpoint))
        assert f"There is no run named {A_RUN}" in answer, endpoint
        assert SECRET_PROMPT not in answer and str(space.runs_dir) not in answer, endpoint
    assert (a_training.run / "config.json").is_file(), "A's run is still there"
    assert "Training" in html.unescape(progress(a_training.client)[0]), "and still training"


def test_another_visitor_sees_nothing_of_a_run_live_or_listed(space, a_training):
    b = Client(space.url, verbose=False)
    seen = " ".join(
        [
            b_sees(b.predict(api_name="/progress")),
            b_sees(b.predict(run_pick=None, api_name="/list_runs")),
            b_sees(b.predict(gen_run_1=A_RUN, prompt="", api_name="/pick_run_1")),
        ]
    )
    assert A_RUN not in seen and SECRET_PROMPT not in seen
    refused = b_sees(b.predict(gen_run_1=A_RUN, prompt="a cat", api_name="/generate"))
    assert f"There is no run named {A_RUN}" in refused


def file_url(space: AppServer, path: Path | str) -> str:
    return f"{space.url}gradio_api/file={path}"


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_runs_files_are_never_served_by_their_path_only_as_copies_to_their_owner(space, a_training):
    run = a_training.run
    private = [
        *sorted((run / "dataset").glob("*.png"))[:1],
        run / "config.json",
        *sorted((run / "samples").glob("*.png"))[:1],
        *sorted((space.runs_dir / STAGING_DIR).rglob("*.png"))[:2],  # the staged pictures and their thumbnails
    ]
    assert len(private) == 5
    for path in private:
        assert status_of(file_url(space, path)) == 403, path
    # The owner's page gets their previews, as copies (which gradio_client has downloaded).
    first = a_training.previews[-1]
    assert Path(first["image"]).read_bytes() == (run / "samples" / Path(first["image"]).name).read_bytes()


def test_an_svg_with_a_script_is_never_stored(space, tmp_path):
    b = Client(space.url, verbose=False)
    svg = tmp_path / "evil.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(localStorage)</script></svg>')
    answer = b_sees(b.predict(upload=[handle_file(str(svg))], api_name="/upload"))
    assert "evil.svg" in answer and "left out" in answer
    assert not list(space.runs_dir.rglob("*.svg"))


def test_a_zip_that_unpacks_past_the_visitors_quota_is_refused_unopened(space, tmp_path):
    b = Client(space.url, verbose=False)
    bomb = tmp_path / "pictures.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", b"\0" * (40 << 20))  # 40 MB of zeros: a 40 kB zip
    assert bomb.stat().st_size < 1 << 20
    answer = b_sees(b.predict(upload=[handle_file(str(bomb))], api_name="/upload"))
    assert "pictures.zip" in answer and "20 MB" in answer
    staged = sum(path.stat().st_size for path in (space.runs_dir / STAGING_DIR).rglob("*") if path.is_file())
    assert staged < 10 << 20


def test_a_file_over_the_size_limit_is_refused_at_the_door(space, tmp_path):
    b = Client(space.url, verbose=False)
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (9 << 20))
    with pytest.raises(Exception, match=r"(?i)too large|exceeds|size"):
        b.predict(upload=[handle_file(str(big))], api_name="/upload")


def test_a_visitor_gets_one_run_at_a_time_and_learns_only_their_place_in_the_queue(space, a_training, tmp_path):
    refused = b_sees(a_training.client.predict(run_name="a-second-run", **QUICK, api_name="/start"))
    assert "you already have 1 run queued or training" in refused.lower()

    b = Client(space.url, verbose=False)
    write_demo_dataset(tmp_path, count=2, size=(64, 64))
    upload_pictures(b, tmp_path)
    queued = b_sees(b.predict(run_name="b-run", max_steps=2, **QUICK, api_name="/start"))
    assert "queued as number 1" in queued and A_RUN not in queued
    assert "queued as number 1" in html.unescape(progress(b)[0])
    assert "b-run" in b_sees(b.predict(api_name="/stop"))


def test_a_preset_saved_through_a_raw_queue_call_goes_to_the_visitors_browser_not_the_apps_files(space):
    from lora_gui.config import PRESETS_DIR

    named = {"Save these settings as a preset named": "visitor-planted"}
    outputs = raw_event(space, "Save as preset", named, "a-stranger", must_succeed=True)
    assert not (PRESETS_DIR / "visitor-planted.json").exists()
    assert any(isinstance(output, dict) and "visitor-planted" in output for output in outputs)
