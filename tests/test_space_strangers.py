"""A Space that strangers share, second round (issue 27): what one visitor could still learn of another's runs
and of the server's files, through gradio_client and raw queue calls. `python app.py` runs as a Space starts it
(SPACE_ID set), with small quotas; each visitor is a gradio_client of their own, so a session of their own."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from helpers.app import QUICK, SPACE, AppServer, raw_event, running_app, shown, text, upload_pictures, wait_until

from lora_gui.demo import write_demo_dataset
from lora_gui.errors import LoraGuiError

pytestmark = pytest.mark.app

SECRET_PROMPT = "photo of my secret friend"


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with running_app(tmp_path_factory.mktemp("space-runs"), "space-strangers.log", env=SPACE) as server:
        yield server


def test_a_preset_name_is_never_a_path_to_another_visitors_settings_or_any_server_file(space):
    from lora_gui.config import load_preset

    other = space.runs_dir / "their-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"sample_prompts": SECRET_PROMPT, "base_model": "their/model"}))
    probes = [str(other / "config"), f"../{space.runs_dir.name}/their-run/config", "../lora_gui/demo_model/model_index"]
    session = "a-stranger-with-presets"
    loaded = raw_event(space, "load", {"lora_gui_presets": {name: {} for name in probes}}, session)
    offered = [name for _, name in next(out["choices"] for out in loaded if isinstance(out, dict) and "choices" in out)]
    for probe in [name for name in probes if name in offered]:  # one the menu lists: Use takes it
        answer = text(tuple(raw_event(space, "Use this preset", {"Preset (ready-made settings)": probe}, session)))
        assert SECRET_PROMPT not in answer and "their/model" not in answer and "_class_name" not in answer, probe
    # The menu offers no path, and the engine reads a path-like name as the unknown name it is, so Use can't either.
    assert not set(probes) & set(offered)
    with pytest.raises(LoraGuiError) as unknown:
        load_preset("no-such-preset")
    for probe in probes:
        with pytest.raises(LoraGuiError) as refused:
            load_preset(probe)
        assert str(refused.value).replace(probe, "X") == str(unknown.value).replace("no-such-preset", "X")


def suggested_after_a_start(client: Client, pictures: Path) -> str:
    """The run name the page suggests to `client` after a run it started with no name typed (the one suggested)."""
    upload_pictures(client, pictures)
    answer = client.predict(run_name="", max_steps=5000, **QUICK, api_name="/start")
    client.predict(api_name="/stop")
    return next(shown(value) for value in answer if str(shown(value)).startswith("my-lora"))


def test_a_suggested_run_name_counts_only_the_visitors_own_runs(space, tmp_path):
    write_demo_dataset(tmp_path, count=2, size=(64, 64))
    a_next = suggested_after_a_start(Client(space.url, verbose=False), tmp_path)
    b_next = suggested_after_a_start(Client(space.url, verbose=False), tmp_path)
    assert a_next.endswith("-2") and b_next.endswith("-2"), (a_next, b_next)  # one run each, whatever others made
    assert a_next != b_next  # and never a name another visitor's run has on disk


def test_a_hub_id_shaped_base_model_is_never_looked_up_on_the_servers_disk(space, tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "mine.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    b = Client(space.url, verbose=False)
    on_disk, nowhere = "lora_gui/demo_model", "lora_gui/no-such-model"  # both owner/name, one a folder here
    answers = [
        text(
            b.predict(
                gen_base_model=name,
                prompt="a cat",
                gen_steps=1,
                size=64,
                gen_upload_1=handle_file(str(lora)),
                api_name="/generate",
            )
        )
        for name in (on_disk, nowhere)
    ]
    assert answers[0].replace(on_disk, "X") == answers[1].replace(nowhere, "X")
    write_demo_dataset(tmp_path / "pictures", count=2, size=(64, 64))
    runs = [ended_run(space, name, tmp_path / "pictures") for name in (on_disk, nowhere)]
    assert runs[0].replace(on_disk, "X") == runs[1].replace(nowhere, "X")


def ended_run(space: AppServer, base_model: str, pictures: Path) -> str:
    """What a new visitor's live view says once the run they started on `base_model` has ended."""
    client = Client(space.url, verbose=False)
    upload_pictures(client, pictures)
    run_name = base_model.replace("/", "-")
    started = text(client.predict(run_name=run_name, base_model=base_model, **QUICK, api_name="/start"))
    assert "started" in started, started
    return html.unescape(wait_until(client, "failed", timeout=120)[0]).replace(run_name, "the run")


def test_a_run_name_another_visitor_holds_reads_as_a_free_one(space, tmp_path):
    write_demo_dataset(tmp_path, count=2, size=(64, 64))
    a, b = Client(space.url, verbose=False), Client(space.url, verbose=False)
    answers = []
    for client in (a, b, b):
        upload_pictures(client, tmp_path)
        answers.append(text(client.predict(run_name="our-name", max_steps=5000, **QUICK, api_name="/start")[0]))
        client.predict(api_name="/stop")
    assert "Training our-name started" in answers[0]
    assert answers[1] == answers[0], "B learns nothing of A's run, and starts their own under the name they chose"
    assert "A run named our-name exists already, so this one is named our-name-2" in answers[2], "B's own duplicate"
    for client in (a, b):
        assert "our-name" in text(client.predict(run_pick=None, api_name="/list_runs"))
