"""A Space shared by strangers, seen in real browsers (Debian's Chromium, driven by Playwright): visitor A tries
the demo and trains it, reloads the page and finds their pictures and run again; visitor B, a browser of their own
(separate localStorage and cookies), sees none of A's pictures or runs anywhere; after the app restarts on the same
runs folder, A's browser still finds their run. `python app.py` runs as a Space starts it (SPACE_ID set).
Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from helpers import app as app_helpers
from helpers.app import start_app, stop_app
from helpers.browser import CHROMIUM, CHROMIUM_ARGS, MINUTE, shot
from helpers.paths import ARTIFACTS
from playwright.sync_api import Locator, Page, expect, sync_playwright

from lora_gui.demo import TRIGGER

pytestmark = pytest.mark.browser

# A Space; the free-disk check is off so that the run does not depend on this computer's disk.
SPACE = {"SPACE_ID": "someone/lora-trainer", "LORA_GUI_MIN_FREE_GB": "0"}
A_RUN = "a-private-demo"
A_PICTURES = [f"{TRIGGER}_{index:02d}.png" for index in range(8)]  # the demo's pictures
OWNER_KEY = "lora_gui_owner"  # the BrowserState keeping the visitor's owner secret
SETTLE = 3  # seconds: A's page shows A's things within this; B's is watched this long for them
SETTLE_MS = SETTLE * 1000


def open_page(page: Page, url: str) -> None:
    """The page opened, once its load handler has given this browser its owner secret (kept encrypted: the text
    stored changes each time it is written)."""
    page.goto(url)
    expect(page.locator("#dataset-checks")).to_be_visible(timeout=MINUTE)
    page.wait_for_function(f"() => localStorage.getItem('{OWNER_KEY}')")


def staged_thumbnails(page: Page) -> Locator:
    return page.locator(".lg-card img")


def run_menu(page: Page) -> Locator:
    return page.get_by_label("LoRA 1: a run you trained", exact=True)


def run_menu_options(page: Page) -> list[str]:
    """The names in Generate's menu of runs to try, as a visitor sees them when they open it."""
    run_menu(page).click()
    options = [text.replace("✓", "").strip() for text in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    return options


def never_shows(read: Callable[[], str], text: str) -> None:
    """`text` stays out of what `read` gives for SETTLE seconds: the time in which A's page showed it to A."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        assert text not in read()
        time.sleep(0.2)


def test_strangers_on_a_space_see_only_their_own_pictures_and_runs(tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "browser-space-server.log"
    log.write_text("")
    process, url = start_app(runs_dir, log, env=SPACE)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            a_context = browser.new_context(viewport={"width": 1280, "height": 900})
            a = a_context.new_page()
            a.set_default_timeout(MINUTE)

            # A: the demo, shortened to a few steps.
            open_page(a, url)
            a.get_by_role("button", name="Try the demo").click()
            expect(a.locator("#train-notice")).to_contain_text("Demo ready")
            a.locator("#setting-max_steps input").fill("6")
            a.get_by_label("Run name").fill(A_RUN)
            a.get_by_role("button", name="Start training").click()
            # The page and the demo answer at once; Start waits for the trainer, which loads as the app starts.
            expect(a.locator("#train-notice")).to_contain_text(f"Training {A_RUN} started", timeout=MINUTE)
            expect(a.locator("#train-progress")).to_contain_text(f"{A_RUN} finished: 6 steps", timeout=3 * MINUTE)

            # A reloads: their browser's owner secret brings their pictures and their run back.
            a.reload()
            expect(a.locator("#dataset-checks")).to_contain_text("8 pictures ready to train", timeout=MINUTE)
            expect(staged_thumbnails(a)).to_have_count(8)
            for name in A_PICTURES:
                expect(a.get_by_label(name, exact=True)).to_have_value(re.compile(f"^a {TRIGGER} on a "))
            shot(a, "space-01-a-dataset-after-reload")
            a.get_by_role("tab", name="Train").click()
            expect(a.locator("#train-progress")).to_contain_text(f"{A_RUN} finished: 6 steps", timeout=SETTLE_MS)
            shot(a, "space-02-a-train-after-reload")
            # The views that must hide A's run from B show it to A, within the time B is watched below.
            a.get_by_role("tab", name="Runs").click()
            expect(a.locator("#runs-table")).to_contain_text(A_RUN, timeout=SETTLE_MS)
            a.get_by_role("tab", name="Generate").click()
            expect(run_menu(a)).to_have_value(A_RUN, timeout=SETTLE_MS)  # the newest run is picked for A
            assert A_RUN in run_menu_options(a)

            # B: a stranger's browser (its own localStorage and cookies) on the same Space.
            b_context = browser.new_context(viewport={"width": 1280, "height": 900})
            b = b_context.new_page()
            b.set_default_timeout(MINUTE)
            open_page(b, url)
            expect(b.locator("#dataset-checks")).to_contain_text("No pictures yet")
            never_shows(b.locator("#dataset-checks").inner_text, "pictures ready to train")
            expect(staged_thumbnails(b)).to_have_count(0)
            for name in A_PICTURES:
                expect(b.get_by_label(name, exact=True)).to_have_count(0)
            b.get_by_role("tab", name="Train").click()
            never_shows(b.locator("#train-progress").inner_text, A_RUN)
            expect(b.locator("#train-progress")).to_contain_text("Nothing has been trained yet")
            b.get_by_role("tab", name="Runs").click()
            never_shows(b.locator("#runs-table").inner_text, A_RUN)
            # Opening A's run by its name gets the answer a run that does not exist gets.
            pick = b.get_by_label("Open a run", exact=True)
            pick.fill(A_RUN)
            pick.press("Enter")
            expect(b.locator("body")).to_contain_text(f"There is no run named {A_RUN}")
            expect(b.locator("#runs-table")).not_to_contain_text(A_RUN)
            shot(b, "space-03-b-runs")
            b.get_by_role("tab", name="Generate").click()
            never_shows(run_menu(b).input_value, A_RUN)
            assert A_RUN not in run_menu_options(b)
            b_context.close()

            # The app restarts on the same runs folder and port (a browser keeps localStorage per address): the key
            # that reads A's owner secret is kept in the runs folder, so A's browser still proves who they are.
            stop_app(process)
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            monkeypatch.setattr(app_helpers, "free_port", lambda: port)
            process, restarted = start_app(runs_dir, log, env=SPACE)
            assert restarted == url
            # A fresh tab in A's browser (its localStorage): the old tab's page may have been dropped by Chromium while
            # the server was down, and reloading a dropped page fails for reasons that have nothing to do with the app.
            a = a_context.new_page()
            a.set_default_timeout(MINUTE)
            open_page(a, url)
            expect(a.locator("#dataset-checks")).to_contain_text("8 pictures ready to train", timeout=MINUTE)
            expect(staged_thumbnails(a)).to_have_count(8)
            a.get_by_role("tab", name="Runs").click()
            # The pictures answer at once; the runs list waits for the trainer, which loads as the app restarts.
            expect(a.locator("#runs-table")).to_contain_text(A_RUN, timeout=MINUTE)
            expect(a.locator("#runs-table")).to_contain_text("finished")
            shot(a, "space-04-a-runs-after-restart")
            browser.close()
    finally:
        stop_app(process)
    assert "Traceback" not in log.read_text(), f"the app logged an error:\n{log.read_text()}"
