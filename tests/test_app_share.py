"""The Runs tab's export and Push to Hub, through gradio_client against an app served from this process,
so the Hub can be replaced by a fake and the process's own logs read: a LoRA downloaded in either layout
loads in diffusers, and the Hugging Face token never reaches a file, a log line or the page."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client
from helpers.app import free_port, shown, text
from helpers.pipes import fresh_pipe, image
from helpers.runs import quick_config

from lora_gui.demo import write_demo_dataset
from lora_gui.jobs import JobManager
from lora_gui.training import train
from lora_gui.ui.app import build_app

pytestmark = pytest.mark.app

SECRET = "hf_TEST_app_secret_456"


@pytest.fixture(scope="module")
def app_here(tiny_model, tmp_path_factory):
    """The app served on a free port by this process, over a runs folder holding one short finished run."""
    runs_dir = tmp_path_factory.mktemp("runs-here")
    photos = write_demo_dataset(tmp_path_factory.mktemp("photos-here"), count=4, size=(64, 64))
    train(quick_config(tiny_model, photos, max_steps=3, sample_every=3), runs_dir / "shared")
    demo, ctx = build_app(runs_dir, JobManager())
    demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    yield SimpleNamespace(client=Client(demo.local_url, verbose=False), runs_dir=runs_dir, model=tiny_model)
    demo.close()
    ctx.engine.jobs.close()


def test_the_lora_downloads_in_either_layout_and_both_files_load_in_diffusers(app_here):
    pictures = {}
    for layout, name in (("kohya", "shared.safetensors"), ("diffusers", "pytorch_lora_weights.safetensors")):
        message, update = app_here.client.predict(run_pick="shared", run_layout=layout, api_name="/export")
        file = shown(update)
        assert Path(file).name == name
        assert f"{name} is ready for" in text(message)
        pipe = fresh_pipe(app_here.model)
        pipe.load_lora_weights(str(Path(file).parent), weight_name=name)
        pictures[layout] = image(pipe)
    base = image(fresh_pipe(app_here.model))
    assert np.abs(pictures["kohya"] - base).max() > 1e-3, "the downloaded LoRA changes nothing"
    np.testing.assert_allclose(pictures["kohya"], pictures["diffusers"], atol=1e-4)  # one LoRA, two layouts

    refused = text(app_here.client.predict(run_pick="no-such-run", run_layout="kohya", api_name="/export")[0])
    assert "There is no run named no-such-run (was it deleted?)" in refused


def test_push_to_hub_keeps_the_token_out_of_files_logs_and_the_page(app_here, fake_hub, caplog):
    caplog.set_level(logging.DEBUG)
    started = time.time()
    run = app_here.runs_dir / "shared"
    pushed = text(
        app_here.client.predict(
            run_pick="shared", hub_repo="me/shared-lora", hub_token=SECRET, hub_private=True, api_name="/push_to_hub"
        )
    )
    assert "Uploaded; only you can see it at" in pushed and 'href="https://huggingface.co/me/shared-lora"' in pushed
    assert fake_hub.calls[:2] == [("init", SECRET), ("create_repo", "me/shared-lora", True, True)]
    assert fake_hub.calls[2][2] == [
        "README.md",
        "pytorch_lora_weights.safetensors",
        "samples/step-3-0.png",
        "shared.safetensors",
    ]

    # Offline (or any failure): a plain message, and nothing in the run folder is lost.
    before = sorted(path.relative_to(run) for path in run.rglob("*"))
    fake_hub.fail = ConnectionError(f"[Errno 111] Connection refused (token {SECRET})")
    failed = text(
        app_here.client.predict(
            run_pick="shared", hub_repo="me/shared-lora", hub_token=SECRET, hub_private=True, api_name="/push_to_hub"
        )
    )
    assert "Could not reach the Hugging Face Hub" in failed and "the run folder is unchanged" in failed
    assert sorted(path.relative_to(run) for path in run.rglob("*")) == before

    assert SECRET not in pushed + failed + caplog.text
    # Nothing this test wrote holds the token: not the runs folder, not Gradio's upload cache.
    gradio_cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    written = [
        path
        for folder in (app_here.runs_dir, gradio_cache)
        for path in folder.rglob("*")
        if path.is_file() and path.stat().st_mtime >= started - 1
    ]
    assert written, "the push rewrote the model card, so something was written"
    assert not [path for path in written if SECRET.encode() in path.read_bytes()]


def test_push_without_a_name_or_to_a_bad_name_says_what_to_do(app_here, fake_hub):
    empty = text(app_here.client.predict(run_pick="shared", hub_repo=" ", hub_token=SECRET, api_name="/push_to_hub"))
    assert "Type a name for the model page on the Hub first." in empty
    bad = text(
        app_here.client.predict(run_pick="shared", hub_repo="me/my lora", hub_token=SECRET, api_name="/push_to_hub")
    )
    assert "is not a Hub repo name: use NAME or OWNER/NAME" in bad and SECRET not in bad
    assert fake_hub.calls == []
