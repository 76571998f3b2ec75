"""Issue 28's newcomer, in a real browser: their own pictures, the demo, back to their own, the demo trained,
a reload, Generate, Runs; at each step what they see is what a person who never trained a model needs: one loud
button, nothing lost or mixed without a choice, times for this computer, the trigger word kept, small pictures drawn
large, messages that belong to what they are about. Screenshots go to test-artifacts/newcomer-*.png."""

from __future__ import annotations

import re

import pytest
from helpers.browser import MINUTE, new_page, shot
from playwright.sync_api import Locator, expect, sync_playwright

from lora_gui.demo import TRIGGER, write_demo_dataset

pytestmark = pytest.mark.browser

LOUD = re.compile(r"\bprimary\b")


def drawn_large_and_sharp(picture: Locator) -> None:
    """A picture shown at least 256 px wide, its pixels enlarged without smoothing."""
    box = picture.bounding_box()
    assert box is not None and box["width"] >= 256, f"drawn {box}"
    assert picture.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"


def test_a_newcomers_whole_path_in_a_real_browser(app_server, tmp_path):
    mine = write_demo_dataset(tmp_path / "mine", count=9, size=(160, 120))
    with sync_playwright() as playwright:
        browser, page = new_page(playwright)
        page.goto(app_server.url)

        # A fresh page: the one loud button is Try the demo; nothing offers to stop what isn't running.
        expect(page.locator("#try-demo")).to_have_class(LOUD)
        expect(page.get_by_role("button", name="Caption pictures without one")).not_to_have_class(LOUD)
        expect(page.get_by_role("button", name="Stop captioning")).to_have_count(0)
        shot(page, "newcomer-01-fresh")

        # Their own nine pictures, one caption fixed by hand.
        page.locator("#dataset-upload input[type=file]").set_input_files(sorted(mine.iterdir()))
        # Answered at once, also while the trainer still loads (tests/test_first_start.py).
        expect(page.locator("#dataset-checks")).to_contain_text("9 pictures ready to train")
        expect(page.locator("#try-demo")).not_to_have_class(LOUD)
        caption = page.get_by_label("demo_00.png")
        caption.fill("a photo of my red circle")
        caption.blur()

        # The demo: their pictures are put aside, not thrown away or mixed in, and one click brings them back.
        page.locator("#try-demo").click()
        expect(page.locator("#train-notice")).to_contain_text("Demo ready")
        page.get_by_role("tab", name="Dataset").click()
        expect(page.locator("#dataset-checks")).to_contain_text("8 pictures ready to train")
        expect(page.get_by_text("Your own 9 pictures are kept").first).to_be_visible()
        expect(page.locator("body")).not_to_contain_text("<b>")  # markup is drawn, never shown as text
        drawn = page.locator(".lg-card img").first.bounding_box()
        assert drawn is not None and drawn["width"] >= 160, f"a 128 px demo picture drawn {drawn}"
        shot(page, "newcomer-02-demo-beside-mine")
        page.locator("#back-to-mine").click()
        expect(page.locator("#dataset-checks")).to_contain_text("9 pictures ready to train")
        expect(page.get_by_label("demo_00.png")).to_have_value("a photo of my red circle")
        # Removing them all asks first, saying how many.
        page.locator("#remove-all").click()
        expect(page.get_by_text("Remove all 9 pictures")).to_be_visible()
        page.get_by_role("button", name="No, keep them").click()
        expect(page.locator("#dataset-checks")).to_contain_text("9 pictures ready to train")
        shot(page, "newcomer-03-back-to-mine")

        # Train the demo: its time said for this computer, the trigger word in sight, Start the one loud button.
        page.locator("#try-demo").click()
        expect(page.locator("#train-notice")).to_contain_text("Demo ready")
        expect(page.locator("#train-estimate")).to_contain_text("On this computer's processor: about")
        expect(page.get_by_label("Trigger word")).to_have_value(TRIGGER)
        expect(page.locator("#start-training")).to_have_class(LOUD)
        expect(page.locator("#stop-training")).to_be_disabled()
        expect(page.locator("#train-hf-token")).to_be_hidden()  # the demo downloads nothing
        page.locator("#setting-max_steps input").fill("30")
        page.locator("#setting-max_steps input").blur()
        page.get_by_label("Run name").fill("newcomer-demo")
        page.locator("#start-training").click()
        expect(page.locator("#train-notice")).to_contain_text("Training newcomer-demo started")
        expect(page.locator("#train-progress")).to_contain_text("newcomer-demo finished: 30 steps", timeout=2 * MINUTE)
        expect(page.locator("#train-notice")).not_to_contain_text("started")  # said while it trained, gone now
        drawn_large_and_sharp(page.locator("#train-samples img").first)
        shot(page, "newcomer-04-trained")

        # A reload: the name box offers a name that is free, the demo's pictures are still the ones shown.
        page.reload()
        page.get_by_role("tab", name="Train").click()
        expect(page.get_by_label("Run name")).not_to_have_value("newcomer-demo")
        expect(page.get_by_label("Run name")).not_to_have_value("")

        # Generate: the prompt keeps the word the LoRA answers to, and its picture is drawn large and sharp.
        page.get_by_role("tab", name="Generate").click()
        expect(page.get_by_label("LoRA 1: a run you trained", exact=True)).to_have_value("newcomer-demo")
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(re.compile(TRIGGER))
        expect(page.locator("#gen-trigger-note")).to_contain_text(f"This LoRA answers to {TRIGGER}")
        page.get_by_role("button", name="Generate", exact=True).click()
        expect(page.locator("#lora-image img")).to_be_visible(timeout=MINUTE)
        drawn_large_and_sharp(page.locator("#lora-image img"))
        drawn_large_and_sharp(page.locator("#base-image img"))
        shot(page, "newcomer-05-generate")

        # Runs: a click in a row opens that run, its story told in the order it happened.
        page.get_by_role("tab", name="Runs").click()
        table = page.locator("#runs-table")
        expect(table.get_by_test_id("cell-0-0")).to_have_text("newcomer-demo")  # newest first
        table.get_by_test_id("cell-0-2").click()  # its "Steps done", not its name
        info = page.locator("#run-info")
        expect(info).to_contain_text(re.compile(r"newcomer-demo: started .*, then finished .* at step 30 of 30"))
        drawn_large_and_sharp(page.locator("#run-previews img").first)
        shot(page, "newcomer-06-runs")
        browser.close()
