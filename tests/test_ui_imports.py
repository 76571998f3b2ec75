"""The page is built and answers before the engine (torch, diffusers, transformers, peft, accelerate) has loaded:
importing the app and building its page import none of them, and the page says the engine is loading until it is.

Each test runs in a fresh Python, where a finder on `sys.meta_path` stands between the app and those packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.app

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")

# Refuses the heavy packages to the main thread, which builds the page, until the engine may load; holds the engine's
# loader (ui/engine.py) until then, so the page can be asked for while the engine is loading. (A finder that waited
# would hold Python's import lock, and every other thread's imports with it.)
FINDER = f"""
import importlib.abc, sys, threading

from lora_gui.ui.engine import Engine

HEAVY = {HEAVY!r}
engine_may_load = threading.Event()


class Heavy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY and not engine_may_load.is_set():
            raise ImportError(f"{{name}} was imported before the engine was to load")
        return None


sys.meta_path.insert(0, Heavy())
load = Engine.load


def held_load(engine, **kwargs):
    engine_may_load.wait()
    load(engine, **kwargs)


Engine.load = held_load


def heavy_imported():
    return sorted(name for name in sys.modules if name.partition(".")[0] in HEAVY)
"""


def run_python(script: str) -> dict:
    """`script` after the finder, in a fresh Python; what it printed last, read as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", FINDER + textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_page_is_built_without_torch_diffusers_transformers_peft_or_accelerate(tmp_path):
    result = run_python(
        f"""
        import json
        from pathlib import Path

        from lora_gui.ui.app import build_app

        demo, ctx = build_app(Path({str(tmp_path / "runs")!r}))
        print(json.dumps({{"heavy": heavy_imported(), "loaded": ctx.engine.loaded, "tabs": len(ctx.components)}}))
        """
    )
    assert result["heavy"] == [], f"building the page imported {result['heavy']}"
    assert not result["loaded"] and result["tabs"] > 100


def test_python_app_py_reaches_the_page_without_them(monkeypatch):
    """`python app.py` goes through the command line: its parser (every command's flags and choices) and its quieting
    of the libraries' chatter come before the page, and import none of them either."""
    result = run_python(
        """
        import json
        from unittest import mock

        import lora_gui.ui.app
        from lora_gui import cli

        with mock.patch.object(lora_gui.ui.app, "launch", lambda **settings: None):
            cli.main(["ui", "--port", "1"])
        print(json.dumps({"heavy": heavy_imported()}))
        """
    )
    assert result["heavy"] == [], f"the command line imported {result['heavy']} before the page"


def test_the_page_answers_and_says_the_engine_is_loading_before_it_has_loaded(tmp_path):
    result = run_python(
        f"""
        import json, time, urllib.request
        from pathlib import Path

        from lora_gui.ui.app import ENGINE_LOADING, build_app, engine_ready

        demo, ctx = build_app(Path({str(tmp_path / "runs")!r}))
        ctx.engine.start()
        demo.launch(prevent_thread_lock=True, ssr_mode=False)
        page = urllib.request.urlopen(demo.local_url, timeout=60).read().decode()
        config = json.loads(urllib.request.urlopen(demo.local_url + "config", timeout=60).read())
        notice = next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "engine-loading")
        while_loading = {{"loaded": ctx.engine.loaded, "heavy": heavy_imported()}}
        engine_may_load.set()
        ready = engine_ready(ctx)  # what the page's load event shows once the engine is here
        demo.close()
        print(json.dumps({{
            "page": "LoRA trainer" in page,
            "notice": ENGINE_LOADING in notice["value"] and notice["visible"],
            "while_loading": while_loading,
            "loaded": ctx.engine.loaded,
            "hidden_once_loaded": ready["engine_loading"]["visible"] is False,
        }}))
        """
    )
    assert result["page"], "the page answered"
    assert result["notice"], "it says the engine is loading"
    assert result["while_loading"] == {"loaded": False, "heavy": []}, "the page answered before the engine loaded"
    assert result["loaded"] and result["hidden_once_loaded"], "once loaded, the notice goes"
