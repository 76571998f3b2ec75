"""The app through its API (gradio_client), as two visitors use it: upload, train, queue, stop,
watch to the end, generate; bad input gets a plain message; a Space keeps server paths private."""

from __future__ import annotations

import dataclasses
import html
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from helpers.app import QUICK, progress, shown, text, upload_pictures, wait_until
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gui.config import TrainConfig, load_preset
from lora_gui.demo import write_demo_dataset
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE, Visitor, anonymous
from lora_gui.runs import RunFolder
from lora_gui.ui import config_form
from lora_gui.ui.app import build_app
from lora_gui.ui.dataset import add_folder
from lora_gui.ui.generate import add_row, remove_row
from lora_gui.ui.model_choices import TINY_CHOICE
from lora_gui.ui.runs import push
from lora_gui.ui.train_tab import start


def pixels(output) -> np.ndarray:
    return np.asarray(Image.open(shown(output)), dtype=np.int16)


@pytest.mark.app
def test_two_visitors_queue_stop_train_to_the_end_and_generate(app_server, tmp_path):
    first, second = Client(app_server.url, verbose=False), Client(app_server.url, verbose=False)
    assert "Added 12 pictures" in upload_pictures(first, write_demo_dataset(tmp_path / "a", count=12, size=(96, 96)))
    assert "Added 6 pictures" in upload_pictures(second, write_demo_dataset(tmp_path / "b", count=6, size=(80, 80)))

    started = text(first.predict(run_name="visitor-a", max_steps=2000, sample_every=0, **QUICK, api_name="/start"))
    assert "Training visitor-a started" in started
    queued = text(second.predict(run_name="visitor-b", max_steps=6, sample_every=3, **QUICK, api_name="/start"))
    assert "Another run (visitor-a) is training right now" in queued and "queued as number 1" in queued
    assert "visitor-b is queued as number 1" in progress(second)[0]

    wait_until(first, "Training <b>visitor-a</b>: step 2")
    assert "Stopping visitor-a" in text(first.predict(api_name="/stop"))
    stopped = wait_until(first, "stopped at step")
    assert "pytorch_lora_weights.safetensors" in text(stopped[4])  # the LoRA so far, offered for download
    assert (app_server.runs_dir / "visitor-a" / "dataset" / "demo_11.png").is_file()  # the drop, kept in the run

    finished = wait_until(second, "<b>visitor-b</b> finished: 6 steps")
    plot, samples, log = finished[1], finished[2], finished[3]
    assert plot["columns"] == ["step", "loss", "curve"]
    assert [row[0] for row in plot["data"]] == [1, 2, 3, 4, 5, 6] * 2  # each step's loss, then the smoothed line
    assert len(samples) == 2  # previews at step 3 and at the end
    assert "Training a sd15 LoRA on 6 images for 6 steps on cpu" in log
    listing = text(second.predict(run_pick=None, api_name="/list_runs"))
    assert "visitor-a" in listing and "stopped" in listing and "finished" in listing

    _, base_model, size, prompt, _, steps, guidance, negative, *_ = second.predict(
        gen_run_1="visitor-b", api_name="/pick_run_1"
    )
    assert base_model == TINY_CHOICE and size == 64 and prompt.startswith("a photo of a")
    assert (steps, guidance) == (25, 7.0) and negative["visible"], "an SD model's usual steps and guidance"
    common = dict(prompt=prompt, gen_steps=4, size=64, api_name="/generate")
    mixed = dict(gen_run_1="visitor-b", strength_1=2.0)
    base, with_lora, message = second.predict(**mixed, **common)
    assert "Made with the LoRA of visitor-b at strength 2, seed 0" in message
    base_pixels, one_lora = pixels(base), pixels(with_lora)
    assert base_pixels.shape == (64, 64, 3)
    assert np.abs(base_pixels - one_lora).mean() > 0.5  # the LoRA changed the picture

    # A second LoRA at its own strength: the kohya file (as AUTOMATIC1111 uses it) of the other run, uploaded.
    kohya = app_server.runs_dir / "visitor-a" / "visitor-a.safetensors"
    mixed.update(gen_upload_2=handle_file(str(kohya)), strength_2=0.7)
    base_again, two_loras, message = second.predict(**mixed, **common)
    assert "Made with the LoRA of visitor-b at strength 2, visitor-a.safetensors at strength 0.7" in message
    assert np.array_equal(pixels(base_again), base_pixels)  # same seed, same base picture
    assert np.abs(pixels(two_loras) - one_lora).mean() > 0.5  # the second LoRA changed it again

    # The same LoRA pickled: refused unless allowed, since loading a pickle can run code.
    pickled = tmp_path / "visitor-a.pt"
    torch.save(load_file(kohya), pickled)
    mixed["gen_upload_2"] = handle_file(str(pickled))
    refused = text(second.predict(**mixed, **common))
    assert "visitor-a.pt is a pickled file, which can run any code on this computer when loaded" in refused
    _, allowed, message = second.predict(**mixed, allow_pickle=True, **common)
    assert "visitor-a.pt at strength 0.7" in message
    assert np.array_equal(pixels(allowed), pixels(two_loras))

    assert "Deleted visitor-a." in text(second.predict(run_pick="visitor-a", api_name="/delete_run"))
    assert not (app_server.runs_dir / "visitor-a").exists()


@pytest.mark.app
def test_bad_input_gets_a_plain_message(app_server, tmp_path):
    visitor = Client(app_server.url, verbose=False)
    assert "There are no usable pictures yet: add some in the Dataset tab first." in text(
        visitor.predict(api_name="/start")
    )
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "broken.png").write_text("not a picture")
    (odd / "notes.docx").write_text("?")
    dropped = upload_pictures(visitor, odd)
    assert "notes.docx: not an image, a .txt caption or a .zip, so it was left out" in dropped
    assert "broken.png</b> can't be used: not an image file" in dropped
    upload_pictures(visitor, write_demo_dataset(tmp_path / "ok", count=2, size=(64, 64)))
    assert "'Steps' must be 1 or more (got 0)" in text(visitor.predict(max_steps=0, api_name="/start"))
    assert "'Learning rate' 0.5 is far too high" in text(visitor.predict(learning_rate=0.5, api_name="/start"))
    assert "Pick a run you trained, or upload a LoRA file" in text(visitor.predict(prompt="x", api_name="/generate"))

    missing = tmp_path / "no-such-model"
    visitor.predict(base_model=str(missing), run_name="bad-model", **QUICK, api_name="/start")
    failed = html.unescape(wait_until(visitor, "failed")[0])
    assert f"Training bad-model failed: base model '{missing}' not found" in failed
    assert "Nothing was trained yet: fix the problem, then press Start training again" in failed


@pytest.mark.app
def test_the_estimate_follows_the_settings_and_the_model(app_server):
    visitor = Client(app_server.url, verbose=False)

    def estimate(**settings) -> str:
        return text(visitor.predict(**settings, api_name="/estimate"))

    unknown = estimate(base_model="someone/a-model-not-downloaded")
    assert "set 'Model family' under Advanced settings" in unknown
    # The base models the menu offers are known by name: a beginner picking one gets an estimate at once.
    offered = estimate(base_model="stabilityai/stable-diffusion-xl-base-1.0", resolution=1024)
    assert "(Stable Diffusion XL)" in offered and gigabytes(offered) > 8
    one = estimate(base_model="someone/a-model-not-downloaded", family="sd15", resolution=512, batch_size=1)
    four = estimate(base_model="someone/a-model-not-downloaded", family="sd15", resolution=512, batch_size=4)
    # No GPU here: the memory a GPU would need, and a rough time on this processor.
    assert "This computer has no NVIDIA GPU" in one and "On this computer's processor: about" in one
    nf4 = estimate(base_model="someone/a-model-not-downloaded", family="sd15", quantize_base="nf4")
    assert "Quantize base' nf4 (4-bit (NF4, bitsandbytes)) runs only on an NVIDIA GPU; on this computer choose" in (
        html.unescape(nf4)
    )
    assert gigabytes(four) > gigabytes(one) + 1
    tiny = estimate(base_model=TINY_CHOICE, resolution=512, batch_size=1)
    assert "The demo and tiny models need almost no memory" in tiny and gigabytes(tiny) == gigabytes(one)
    assert "made for 1024 px pictures" not in tiny
    sdxl = estimate(base_model="someone/a-model-not-downloaded", family="sdxl", resolution=512)
    assert "Stable Diffusion XL models are made for 1024 px pictures, and Resolution is 512" in sdxl
    assert "No estimate until the settings are fixed: 'Batch size' must be between 1" in estimate(batch_size=0)


@pytest.mark.train
def test_on_a_gpu_the_estimate_gives_the_time_and_warns_when_the_card_is_too_small(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from lora_gui import devices
    from lora_gui.ui.train_tab import show_estimate

    measured = []
    monkeypatch.setattr(devices, "matmul_tflops", lambda: measured.append(1) or 400.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=8 * 2**30))
    _, ctx = build_app(tmp_path, JobManager())
    settings = {**config_form.widget_values(TrainConfig()), "family": "sd15", "max_steps": 1000}

    fits = html.unescape(show_estimate(ctx, base_model="someone/model", **settings)["estimate"])
    assert re.search(r"Estimate for Stable Diffusion 1.x: ≈ [\d.]+ GB of GPU memory, about \d+ (s|min)\.", fits)
    assert "more than this GPU" not in fits
    too_big = html.unescape(show_estimate(ctx, base_model="someone/model", **{**settings, "batch_size": 8})["estimate"])
    # The presets made for SD 1.5 fit an 8 GB card: the advice names one first.
    assert (
        "That is more than this GPU's 8 GB: pick the sd15-character preset (≈ 3.4 GB), or turn on Gradient" in too_big
    )
    # With checkpointing on, the previews at the end are the peak: only a smaller picture lowers it.
    sdxl = {**config_form.widget_values(load_preset("sdxl-low-vram")), "family": "sdxl"}
    previews = html.unescape(show_estimate(ctx, base_model="someone/model", **sdxl)["estimate"])
    assert (
        "That is more than this GPU's 8 GB: set Quantize base to int8 or nf4, lower Resolution: the preview" in previews
    )
    assert "low-VRAM preset" not in previews, "the low-VRAM presets keep the resolution: they don't lower this peak"
    assert measured == [1], "the GPU's speed is measured once, then remembered"

    # While a run trains, measuring would time the run too: no time until it ends.
    _, ctx = build_app(tmp_path, JobManager())
    monkeypatch.setattr(ctx.engine.jobs, "active", lambda: object())
    busy = html.unescape(show_estimate(ctx, base_model="someone/model", **settings)["estimate"])
    assert "unknown time" in busy and "The time shows once no run is training" in busy
    assert measured == [1]


def gigabytes(message: str) -> float:
    return float(re.search(r"≈ ([\d.]+) GB of GPU memory", message).group(1))


@pytest.mark.app
@pytest.mark.parametrize(
    ("menu", "family", "version", "usual"),
    [
        ("Tiny SDXL demo (offline, CPU)", "sdxl", "sdxl_base_v1-0", (25, 7.0)),
        ("Tiny Flux demo (offline, CPU)", "flux", "flux1", (28, 3.5)),
        ("Tiny Z-Image demo (offline, CPU)", "zimage", "z_image", (30, 4.0)),
    ],
    ids=["sdxl", "flux", "zimage"],
)
def test_a_tiny_model_of_another_family_trains_and_generates_through_the_app(
    app_server, tmp_path, menu, family, version, usual
):
    visitor = Client(app_server.url, verbose=False)
    upload_pictures(visitor, write_demo_dataset(tmp_path / "p", count=4, size=(64, 64)))
    # What picking the model in the menu sets: the page's first settings (the demo's) teach a text encoder too.
    settings = {**QUICK, "max_steps": 3, "sample_every": 0, "train_text_encoder": False}
    started = visitor.predict(base_model=menu, run_name=f"{family}-run", **settings, api_name="/start")
    assert f"Training {family}-run started" in text(started)
    log = wait_until(visitor, f"<b>{family}-run</b> finished: 3 steps")[3]
    assert f"Training a {family} LoRA on 4 images for 3 steps on cpu" in log

    _, base_model, size, prompt, _, steps, guidance, negative, *_ = visitor.predict(
        gen_run_1=f"{family}-run", api_name="/pick_run_1"
    )
    assert base_model == menu and size == 64
    assert (steps, guidance) == usual, "the model's usual steps and guidance are filled in"
    assert negative["visible"] == (family != "flux"), "Flux takes no negative prompt: its field hides"
    base, with_lora, message = visitor.predict(
        gen_run_1=f"{family}-run",
        gen_base_model=base_model,
        prompt=prompt,
        gen_steps=3,
        size=64,
        api_name="/generate",
    )
    assert f"Made with the LoRA of {family}-run at strength 1" in message
    assert np.abs(pixels(base) - pixels(with_lora)).mean() > 0.5

    # Its file for other programs, from the Generate tab, says which model family it is for.
    message, file = visitor.predict(
        gen_export_run=f"{family}-run", gen_layout="kohya", api_name="/export_from_generate"
    )
    programs = {"sdxl": "AUTOMATIC1111, Forge and ComfyUI", "flux": "Forge and ComfyUI", "zimage": "ComfyUI"}[family]
    assert f"{family}-run.safetensors is ready for {programs}:" in text(message)
    with safe_open(shown(file), framework="pt") as kohya:
        assert kohya.metadata()["ss_base_model_version"] == version


@pytest.mark.train
def test_removing_a_lora_row_moves_the_rows_below_it_up(tmp_path):
    _, ctx = build_app(tmp_path, JobManager())
    rows = {"gen_run_1": "a", "gen_upload_1": None, "strength_1": 0.5}
    rows |= {"gen_run_2": None, "gen_upload_2": "/files/b.safetensors", "strength_2": 0.7}
    rows |= {"gen_run_3": "c", "gen_upload_3": None, "strength_3": 1.5}
    assert add_row(ctx, gen_rows=2)["lora_row_3"]["visible"] and add_row(ctx, gen_rows=2)["gen_rows"] == 3
    after = remove_row(ctx, row=2, gen_rows=3, **rows)
    assert after["gen_rows"] == 2
    assert [after["gen_run_2"], after["gen_upload_2"], after["strength_2"]] == ["c", None, 1.5]
    assert [after["gen_run_3"], after["gen_upload_3"], after["strength_3"]] == [None, None, 1.0]
    assert after["lora_row_2"]["visible"] and not after["lora_row_3"]["visible"]
    assert after["gen_run_1"] == "a"


@pytest.mark.unit
def test_every_setting_has_one_widget_and_comes_back_as_the_same_config():
    names = config_form.field_names()
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(names) == fields - set(config_form.APP_FIELDS)
    assert names[:4] == ["resolution", "max_steps", "learning_rate", "rank"]  # the main ones come first
    preset = load_preset("sd15-style").replace(sample_prompts=["a cat, in the style of sks", "a dog"])
    values = config_form.widget_values(preset)
    assert values["sample_prompts"] == "a cat, in the style of sks\na dog"  # one prompt per line: commas are fine
    rebuilt = config_form.config_from_values({**values, "base_model": preset.base_model, "data": ""})
    assert rebuilt == preset


@pytest.mark.train
def test_on_a_space_visitors_cannot_use_server_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("SPACE_ID", "someone/lora-trainer")
    monkeypatch.delenv("LORA_GUI_ALLOW_PATHS", raising=False)
    _, ctx = build_app(tmp_path, JobManager())
    assert not ctx.models.allow_paths
    stranger = Visitor(owner=anonymous("a stranger's secret"))
    refused_folder = add_folder(
        ctx, stranger, folder="/etc", session="", resolution=512, default_caption="", dataset_version=0
    )
    assert "does not let visitors read server folders" in refused_folder["dataset_notice"]
    settings = config_form.widget_values(TrainConfig())
    refused = start(ctx, stranger, session="", run_name="x", base_model=str(tmp_path), **settings)
    assert "This Space does not let visitors use files on the server" in refused["train_notice"]
    assert ctx.models.resolve("owner/model") == "owner/model"  # Hub ids are fine

    # Without a token typed in, a push would go out under the Space owner's own Hub login.
    refused_push = push(ctx, stranger, run_pick="x", hub_repo="me/x", hub_token=" ", hub_private=True)
    assert "Paste a Hugging Face token with write access first" in refused_push["hub_notice"]

    monkeypatch.setenv("LORA_GUI_ALLOW_PATHS", "1")
    _, ctx = build_app(tmp_path, JobManager())
    assert ctx.models.allow_paths and ctx.models.resolve(str(tmp_path)) == str(tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("auth", ["nopassword", ":x"])
def test_auth_must_be_user_and_password(auth):
    from lora_gui.errors import ConfigError
    from lora_gui.ui.app import launch

    with pytest.raises(ConfigError, match="--auth must be USER:PASS"):
        launch(auth=auth)


@pytest.mark.unit
def test_the_readme_is_a_space_card_that_leads_with_a_screenshot():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    front, _, body = readme.removeprefix("---\n").partition("\n---\n")
    assert {"sdk: gradio", "app_file: app.py", "pinned: false", "sdk_version: 6.31.0"} <= set(front.splitlines())
    assert body.lstrip().startswith("# LoRA trainer\n\n![")
    screenshot = root / "docs" / "screenshot.png"
    assert f"]({screenshot.relative_to(root)})" in body and screenshot.stat().st_size < 300_000
    # What it is, then the two commands, before anything about Spaces; the front matter holds only what Spaces read.
    install, tests, space = (body.index(text) for text in ("python app.py\n```", "bash scripts/test.sh\n```", "Space"))
    assert "pip install -r requirements.txt && python app.py" in body and install < tests < space
    assert "Python 3.10" in body[:install] and "#" not in front


@pytest.mark.train
def test_resume_in_the_train_tab_takes_the_forms_new_learning_rate(tiny_model, photos, tmp_path):
    """ "Lower the learning rate and resume" can be followed from the page: the rest stays as the run started."""
    from lora_gui.ui.train_tab import RESUMED_FROM_THE_FORM, resume

    _, ctx = build_app(tmp_path / "runs", JobManager())
    try:
        config = TrainConfig(
            base_model=str(tiny_model), data=str(photos), resolution=64, max_steps=30, batch_size=2, rank=4,
            learning_rate=1e-3, checkpoint_every=2, sample_every=0, sample_steps=2, seed=7,
        )  # fmt: skip
        job = ctx.engine.jobs.submit(config, tmp_path / "runs" / "diverged")
        deadline = time.monotonic() + 120
        while job.snapshot().step < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ctx.engine.jobs.stop(job.job_id)
        stopped = ctx.engine.jobs.wait(job.job_id, timeout=120).step

        form = config_form.widget_values(config.replace(learning_rate=2e-4))
        answer = resume(ctx, EVERYONE, job.job_id, None, **{name: form[name] for name in RESUMED_FROM_THE_FORM})
        resumed = ctx.engine.jobs.wait(answer["train_job"], timeout=120)
    finally:
        ctx.engine.jobs.close()
    rows = RunFolder(tmp_path / "runs" / "diverged").read_metrics()
    assert resumed.status == "finished" and resumed.step == 30
    assert {row["lr"] for row in rows if row["step"] > stopped} == {2e-4}
    assert {row["lr"] for row in rows if row["step"] <= stopped} == {1e-3}
