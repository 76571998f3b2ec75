"""Where things are: the checkout, and test-artifacts/ (screenshots and the app's logs, for a person to look at)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
