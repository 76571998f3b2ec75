"""Twenty strangers on one Space at once, through the page's API, while one visitor's tiny run trains: every poll
answered, no step of the run lost, nothing of one visitor seen or held by another. The driver is
scripts/load_test.py, which also prints the latencies (for RELIABILITY.md); nothing here is timed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers.paths import ARTIFACTS, ROOT

pytestmark = pytest.mark.app

CLIENTS = 20


def load_driver():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_twenty_visitors_uploading_editing_and_polling_lose_no_poll_no_step_and_see_nothing_of_each_other(tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "load-server.log"
    log.write_text("")
    result = load_driver().run_load(clients=CLIENTS, seconds=10, baseline=0, runs_dir=tmp_path / "runs", log=log)
    print(result.table())

    # Every visitor did everything once at least, while the run trained.
    assert result.uploads == CLIENTS and result.caption_edits >= CLIENTS and result.polls >= CLIENTS
    assert result.steps_during_load > 0
    assert result.unanswered == []
    assert result.lost_steps == []
    assert result.leaks == []
    assert result.errors == []
