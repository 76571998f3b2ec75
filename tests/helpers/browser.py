"""Debian's Chromium as Playwright drives it here (no browser of Playwright's own is downloaded), and screenshots for a
person to look at in test-artifacts/."""

from __future__ import annotations

from playwright.sync_api import Browser, Page, Playwright

from .paths import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MINUTE = 60_000


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def new_page(playwright: Playwright) -> tuple[Browser, Page]:
    """Chromium and a page of a laptop screen's size that waits up to a minute for what a test expects."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(MINUTE)
    return browser, page
