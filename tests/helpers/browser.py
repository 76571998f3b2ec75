"""Debian's Chromium as Playwright drives it here (no browser of Playwright's own is downloaded), and screenshots for a
person to look at in test-artifacts/."""

from __future__ import annotations

from playwright.sync_api import Page

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
