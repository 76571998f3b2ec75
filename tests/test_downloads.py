"""Downloads people can follow: a Hub model downloads only what loads, with progress in bytes and files (the Train
tab's progress box, Generate's progress bar); a gated model says where to accept its licence and where to give a
token; the token goes to the download and nowhere else.

Nothing leaves this machine: huggingface_hub's own snapshot_download runs against `FakeHub`, which answers its
calls to the Hub and sends each file in chunks through the progress bars it is given, into a temporary cache."""

from __future__ import annotations

import itertools
import json
from contextvars import ContextVar

import pytest
from helpers.flux_files import bfl_checkpoint
from helpers.hub import NEVER_LOADED, REPO, FakeHub, response, serve
from helpers.pipes import fresh_pipe
from helpers.runs import quick_config
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from lora_gui import downloads
from lora_gui.base_models import load_pipeline
from lora_gui.downloads import DownloadProgress
from lora_gui.errors import ModelLoadError
from lora_gui.jobs import JobManager, JobState
from lora_gui.owners import EVERYONE
from lora_gui.training import train
from lora_gui.ui.app import build_app
from lora_gui.ui.generate import generate
from lora_gui.ui.train_live import progress_html as _progress_html

TOKEN = "hf_TEST_download_token_42"
EVENT: ContextVar[str] = ContextVar("event")  # stands in for the context variables Gradio's progress bar reads
# FLUX.1-dev's files that from_pretrained never loads: Black Forest Labs' own single files.
NEVER_LOADED_FLUX = {"flux1-dev.safetensors": 4_000_000, "ae.safetensors": 300_000}


@pytest.fixture
def hub(tiny_model, download_cache, monkeypatch) -> FakeHub:
    return serve(monkeypatch, FakeHub(REPO, tiny_model, download_cache, NEVER_LOADED))


@pytest.mark.train
def test_a_hub_model_downloads_only_what_loads_reporting_bytes_and_files_up_to_the_total(hub):
    reports: list[DownloadProgress] = []
    family, pipe = load_pipeline(REPO, token=TOKEN, on_progress=reports.append)

    assert family.name == "sd15" and pipe.unet is not None
    assert sorted(hub.fetched) == sorted(hub.model_files), "nothing from_pretrained never loads"
    assert set(hub.tokens) == {TOKEN}
    assert len(reports) > 2, "reported while it downloaded, not only at the end"
    for earlier, later in itertools.pairwise(reports):
        assert earlier.done_bytes <= later.done_bytes and earlier.files_done <= later.files_done
    assert {(report.total_bytes, report.files_total) for report in reports} == {(hub.bytes_of_the_model(), 10)}
    assert reports[-1] == DownloadProgress(REPO, hub.bytes_of_the_model(), hub.bytes_of_the_model(), 10, 10)

    again: list[DownloadProgress] = []
    load_pipeline(REPO, token=TOKEN, on_progress=again.append)
    assert again == [] and len(hub.fetched) == 10, "a model downloaded once is not downloaded again"


SDXL_REPO = {  # stabilityai/stable-diffusion-xl-base-1.0's files, less its pictures and some of its ONNX files
    "": "model_index.json sd_xl_base_1.0.safetensors sd_xl_offset_example-lora_1.0.safetensors README.md",
    "scheduler": "scheduler_config.json",
    "text_encoder": "config.json flax_model.msgpack model.fp16.safetensors model.onnx model.safetensors "
    "openvino_model.bin openvino_model.xml",
    "text_encoder_2": "config.json flax_model.msgpack model.fp16.safetensors model.onnx model.onnx_data "
    "model.safetensors openvino_model.bin openvino_model.xml",
    "tokenizer": "merges.txt special_tokens_map.json tokenizer_config.json vocab.json",
    "tokenizer_2": "merges.txt special_tokens_map.json tokenizer_config.json vocab.json",
    "unet": "config.json diffusion_flax_model.msgpack diffusion_pytorch_model.fp16.safetensors "
    "diffusion_pytorch_model.safetensors model.onnx model.onnx_data openvino_model.bin openvino_model.xml",
    "vae": "config.json diffusion_flax_model.msgpack diffusion_pytorch_model.fp16.safetensors "
    "diffusion_pytorch_model.safetensors",
    "vae_1_0": "config.json diffusion_pytorch_model.fp16.safetensors diffusion_pytorch_model.safetensors",
    "vae_decoder": "config.json model.onnx openvino_model.bin openvino_model.xml",
}


@pytest.mark.train
def test_what_downloads_is_what_from_pretrained_would_fetch(tiny_models):
    """SDXL's repo holds its weights in many formats; from_pretrained fetches one of them (vae_1_0's too: diffusers
    fetches every folder's weights), and the download ahead of it fetches the same."""
    files = [f"{folder}/{name}".lstrip("/") for folder, names in SDXL_REPO.items() for name in names.split()]
    index = json.loads((tiny_models("sdxl") / "model_index.json").read_text())
    chosen = filter_repo_objects(files, **downloads._download_patterns(index, configs_only=()))
    tokenizer = SDXL_REPO["tokenizer"].split()
    assert sorted(chosen) == sorted(
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            *(f"tokenizer/{name}" for name in tokenizer),
            *(f"tokenizer_2/{name}" for name in tokenizer),
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae_1_0/diffusion_pytorch_model.safetensors",
        ]
    )


@pytest.mark.train
def test_a_gated_model_says_where_to_accept_its_licence_and_where_to_give_a_token(hub):
    hub.gated, hub.accepted = True, TOKEN
    with pytest.raises(ModelLoadError) as without_token:
        load_pipeline(REPO)
    message = str(without_token.value)
    assert f"{REPO} is gated: accept its licence on https://huggingface.co/{REPO}" in message
    assert "'Hugging Face token' (Train tab, Generate tab)" in message and "HF_TOKEN" in message

    with pytest.raises(ModelLoadError) as other_account:
        load_pipeline(REPO, token="hf_TEST_someone_who_did_not_accept")
    assert "signed in to the Hugging Face account the token belongs to" in str(other_account.value)

    family, _ = load_pipeline(REPO, token=TOKEN)
    assert family.name == "sd15"


@pytest.mark.train
def test_a_token_hugging_face_does_not_know_is_said_to_be_refused(hub, monkeypatch):
    def refuse(repo_id: str, filename: str, token: object = None) -> str:
        raise HfHubHTTPError("401 Client Error: Invalid credentials in Authorization header", response=response(401))

    monkeypatch.setattr(downloads, "hf_hub_download", refuse)
    with pytest.raises(ModelLoadError, match=r"Hugging Face refused the token .*huggingface\.co/settings/tokens"):
        load_pipeline(REPO, token="hf_TEST_mistyped")


@pytest.mark.train
def test_a_runs_token_reaches_the_download_and_is_never_kept(hub, photos, tmp_path):
    hub.gated, hub.accepted = True, TOKEN
    manager = JobManager()
    try:
        job = manager.submit(quick_config(REPO, photos, max_steps=2), tmp_path / "run", hub_token=TOKEN)
        state = manager.wait(job.job_id, timeout=300)
    finally:
        manager.close()

    assert state.status == "finished", state.error
    assert set(hub.tokens) == {TOKEN}
    assert any(line.endswith(f"Downloading {REPO}: 3.9 MB in 10 files") for line in state.log)
    assert state.download is None, "the download is over once the run reports something else"
    assert TOKEN not in repr(state) and job.take_hub_token() is None
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert len(files) > 5 and not [path for path in files if TOKEN.encode() in path.read_bytes()]


@pytest.mark.unit
def test_the_train_tab_shows_the_download_before_the_first_step():
    state = JobState(
        job_id=1,
        run_name="flux-run",
        run_dir="/nowhere",
        status="running",
        download=DownloadProgress("black-forest-labs/FLUX.1-dev", 3_200_000_000, 33_700_000_000, 5, 23),
    )
    shown = _progress_html(state, 0)
    assert "Downloading <b>black-forest-labs/FLUX.1-dev</b>: <span>3.2 of 33.7 GB · 5 of 23 files</span>" in shown
    assert 'style="width:9.5%"' in shown


@pytest.mark.train
def test_generate_downloads_the_base_model_in_its_progress_bar(hub, tiny_model, photos, tmp_path):
    _, ctx = build_app(tmp_path / "runs")
    train(quick_config(tiny_model, photos, max_steps=1), ctx.runs_dir / "lora")
    shown: list[tuple[float, str, str | None]] = []

    def progress(fraction: float, desc: str) -> None:  # as Gradio's: it finds its event in context variables
        shown.append((fraction, desc, EVENT.get(None)))

    EVENT.set("this visitor's click")

    result = generate(
        ctx,
        EVERYONE,
        allow_pickle=False,
        gen_base_model=REPO,
        prompt="a red square",
        negative_prompt="",
        gen_seed=0,
        gen_steps=2,
        guidance=5.0,
        size=64,
        gen_hf_token=f" {TOKEN} ",
        progress=progress,
        gen_run_1="lora",
    )

    assert "Made with the LoRA of lora" in result["gen_notice"]
    assert set(hub.tokens) == {TOKEN}
    megabytes = hub.bytes_of_the_model() / 1e6
    # The download's last word, then each picture's steps as it is made.
    downloaded = [desc for _, desc, _ in shown if desc.startswith("Downloading")]
    assert downloaded[-1] == f"Downloading {REPO}: {megabytes:.1f} of {megabytes:.1f} MB · 10 of 10 files"
    assert shown[-1][:2] == (1.0, "Base model alone: step 3 of 3")
    assert len(shown) > 2 and {event for _, _, event in shown} == {"this visitor's click"}


@pytest.mark.unit
def test_the_token_boxes_are_password_boxes_and_a_space_never_lends_its_owners_login(tmp_path, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    _, ctx = build_app(tmp_path)
    assert ctx["hf_token"].type == ctx["gen_hf_token"].type == "password"
    assert ctx.models.hub_token(f" {TOKEN} ") == TOKEN
    assert ctx.models.hub_token("") is None, "on one's own computer, an empty box means this computer's login"

    monkeypatch.setenv("SPACE_ID", "someone/lora-trainer")
    _, space = build_app(tmp_path)
    assert space.models.hub_token(TOKEN) == TOKEN
    assert space.models.hub_token("") is False, "a visitor without a token downloads with none, never the owner's"


@pytest.mark.train
def test_a_single_flux_file_downloads_the_rest_of_its_model_but_the_transformer_it_has(
    tiny_models, tmp_path, download_cache, monkeypatch
):
    companion = "black-forest-labs/FLUX.1-dev"
    hub = serve(monkeypatch, FakeHub(companion, tiny_models("flux"), download_cache, NEVER_LOADED_FLUX))
    hub.gated, hub.accepted = True, TOKEN
    path = bfl_checkpoint(fresh_pipe(tiny_models("flux")).transformer, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(str(path))
    assert str(refused.value).startswith(
        "flux1-dev.safetensors is a Flux.1 transformer in one file; the VAE, text encoders and configuration that go "
        f"with it come from {companion}; {companion} is gated: accept its licence on https://huggingface.co/{companion}"
    )

    reports: list[DownloadProgress] = []
    family, _ = load_pipeline(str(path), token=TOKEN, on_progress=reports.append)
    assert family.name == "flux"
    assert "transformer/config.json" in hub.fetched
    assert not [name for name in hub.fetched if name.startswith("transformer/") and name.endswith(".safetensors")]
    assert reports[-1].done_bytes == reports[-1].total_bytes == sum(hub.sizes[name] for name in hub.fetched)
