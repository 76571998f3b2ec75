"""`python app.py` as a newcomer starts it: the page answers within seconds, pictures dropped and Try the demo are
answered while the engine loads behind it, and nothing printed is a warning they can't act on."""

from __future__ import annotations

import re
import time

import pytest
from gradio_client import Client
from helpers.app import ENGINE_READY, LIBRARY_NOISE, gradio_import_seconds, start_app, stop_app, text, upload_pictures
from helpers.paths import ARTIFACTS

from lora_gui.demo import write_demo_dataset

# A start says where the page is and when the trainer has loaded, and nothing else: no warning at all.
NOISE = re.compile(rf"warn|{LIBRARY_NOISE.pattern}", re.IGNORECASE)


@pytest.mark.app
@pytest.mark.alone
def test_the_page_answers_within_five_seconds_and_the_start_prints_no_warnings(tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "first-start.log"
    log.write_text("")
    started = time.monotonic()
    process, url = start_app(tmp_path / "runs", log)
    answered = time.monotonic() - started
    try:
        # The engine takes seconds more to load; the Dataset tab and the demo don't wait for it.
        visitor = Client(url, verbose=False)
        added = upload_pictures(visitor, write_demo_dataset(tmp_path / "pictures", count=2, size=(64, 64)))
        demo = text(visitor.predict(api_name="/try_demo"))
        before_the_engine = ENGINE_READY not in log.read_text()
        deadline = time.monotonic() + 120
        while ENGINE_READY not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_app(process)
    printed = log.read_text()
    # Most of it is importing Gradio, 3 s on this 2-core machine when it is quiet and up to 4.5 s when its host is
    # busy: the page answers within 5 s, or, in a busy moment, within 2.5 s of what Gradio's import takes then.
    budget = max(5.0, gradio_import_seconds() + 2.5)
    assert answered < budget, f"the page answered {answered:.1f} s after python app.py (budget {budget:.1f} s)"
    assert ENGINE_READY in printed, printed
    assert "Added 2 pictures" in added and "Demo ready" in demo
    assert before_the_engine, "a drop and Try the demo waited for the engine"
    assert f"open at {url.rstrip('/')}" in printed and "python app.py --share" in printed, printed
    assert not NOISE.search(printed), f"the start printed noise:\n{printed}"
