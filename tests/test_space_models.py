"""Base models on a public Space, where strangers name them through the app's API: a Hub id or the app's own tiny
models and nothing else, never looked up as the server's paths (the same message whatever exists there); the
owner's allow-list (LORA_GUI_BASE_MODELS) and size limit (LORA_GUI_MAX_MODEL_GB), read from the Hub before any
file is fetched. On one's own computer, paths work as before."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest
from gradio_client import Client
from helpers.app import free_port, text
from helpers.hub import NEVER_LOADED, REPO, FakeHub, response, serve
from huggingface_hub.errors import RepositoryNotFoundError

from lora_gui import base_models, downloads
from lora_gui.base_models import load_pipeline
from lora_gui.demo import DEMO_MODEL
from lora_gui.errors import LoraGuiError, ModelLoadError
from lora_gui.jobs import JobManager
from lora_gui.model_policy import HUB_IDS_ONLY, BaseModelPolicy
from lora_gui.ui.app import build_app
from lora_gui.ui.model_choices import TINY_CHOICE


@pytest.fixture
def space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/lora-trainer")
    for name in ("LORA_GUI_ALLOW_PATHS", "LORA_GUI_BASE_MODELS", "LORA_GUI_MAX_MODEL_GB"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server_files(tmp_path, monkeypatch) -> SimpleNamespace:
    """A model folder on the server, named both by its full path and, from the working directory, like a Hub id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "private" / "model").mkdir(parents=True)
    (tmp_path / "private" / "model" / "model_index.json").write_text("{}")
    return SimpleNamespace(
        existing=str(tmp_path / "private" / "model"),
        missing=str(tmp_path / "private" / "nothing"),
        existing_hub_shaped="private/model",
        missing_hub_shaped="private/nothing",
    )


@pytest.fixture
def probes(monkeypatch) -> list[str]:
    """Every path the process asks the filesystem about, as it asks."""
    asked: list[str] = []
    for method in ("exists", "is_file", "is_dir", "stat"):
        original = getattr(pathlib.Path, method)

        def recording(path, *args, _original=original, **kwargs):
            asked.append(str(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, method, recording)
    return asked


@pytest.fixture
def hub_knows_nothing(monkeypatch):
    """The Hub, online, answering that no repo exists."""

    def not_found(repo_id, filename, token=None):
        raise RepositoryNotFoundError(f"{repo_id} not found", response=response(404))

    monkeypatch.setattr(downloads, "constants", SimpleNamespace(HF_HUB_OFFLINE=False))
    monkeypatch.setattr(downloads, "hf_hub_download", not_found)


@pytest.mark.app
def test_on_a_space_the_api_answers_the_same_whatever_the_server_holds(
    space, server_files, probes, hub_knows_nothing, tmp_path
):
    demo, ctx = build_app(tmp_path / "runs", JobManager())
    demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        probes.clear()

        def answer(base_model: str, api_name: str) -> str:
            named = {"run_name": "x"} if api_name == "/start" else {}
            return text(client.predict(base_model=base_model, **named, api_name=api_name))

        for endpoint in ("/start", "/estimate"):
            assert answer(server_files.existing, endpoint) == answer(server_files.missing, endpoint)
            hub_shaped = answer(server_files.existing_hub_shaped, endpoint)
            assert hub_shaped == answer(server_files.missing_hub_shaped, endpoint).replace("nothing", "model")
        assert "O" + HUB_IDS_ONLY[1:] in answer(server_files.existing, "/start")
        assert "Could not load private/model: no such model on the Hub" in answer("private/model", "/start")
    finally:
        demo.close()
        ctx.engine.jobs.close()
    assert not [path for path in probes if "private" in path], "a visitor's base model was looked up on disk"


@pytest.mark.train
def test_the_engine_in_hub_only_mode_never_looks_at_the_servers_files(server_files, probes, hub_knows_nothing):
    hub_only = BaseModelPolicy(hub_only=True)
    messages = []
    for name in (server_files.existing, server_files.missing):
        with pytest.raises(ModelLoadError) as refused:
            load_pipeline(name, policy=hub_only)
        messages.append(str(refused.value))
    assert messages == [HUB_IDS_ONLY, HUB_IDS_ONLY]
    with pytest.raises(ModelLoadError, match="no such model on the Hub"):
        load_pipeline(server_files.existing_hub_shaped, policy=hub_only)
    assert base_models.family_from_files(server_files.existing_hub_shaped, hub_only) is None
    assert not [path for path in probes if "private" in path]


@pytest.mark.train
def test_on_a_space_the_runs_and_generate_load_by_the_same_rule(
    space, server_files, probes, hub_knows_nothing, photos, tmp_path
):
    """The page's checks are not the only guard: what a run or Generate loads goes through the policy too."""
    from helpers.runs import quick_config

    from lora_gui.training import train

    _, ctx = build_app(tmp_path / "runs", JobManager())
    try:
        assert ctx.engine.jobs.model_policy.hub_only and ctx.engine.generators.policy.hub_only
        config = quick_config(server_files.existing_hub_shaped, photos)
        with pytest.raises(LoraGuiError, match="no such model on the Hub"):
            train(config, tmp_path / "run", model_policy=ctx.engine.jobs.model_policy)
        with (
            pytest.raises(LoraGuiError, match="no such model on the Hub"),
            ctx.engine.generators.use(server_files.existing_hub_shaped),
        ):
            pass
    finally:
        ctx.engine.jobs.close()
    assert not [path for path in probes if "private" in path], "a visitor's base model was looked up on disk"


@pytest.mark.train
def test_a_hub_id_outside_the_allow_list_is_refused_naming_the_allowed_ones(space, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_GUI_BASE_MODELS", "stabilityai/sdxl-turbo, Owner/Allowed")
    monkeypatch.setattr(downloads, "constants", SimpleNamespace(HF_HUB_OFFLINE=True))  # no size to read
    _, ctx = build_app(tmp_path, JobManager())
    with pytest.raises(LoraGuiError) as refused:
        ctx.models.resolve("someone/else")
    assert str(refused.value) == (
        "someone/else is not one of the base models this server offers: stabilityai/sdxl-turbo, Owner/Allowed"
    )
    assert ctx.models.resolve("owner/allowed") == "owner/allowed"  # the Hub ignores case
    tiny = ctx.models.resolve(TINY_CHOICE)
    assert tiny == str(DEMO_MODEL)  # the app's own models are always there, and they load from its disk
    family, _ = load_pipeline(tiny, policy=ctx.models.policy)
    assert family.name == "sd15"


@pytest.mark.train
def test_a_hub_model_over_the_size_limit_is_refused_before_any_download(
    space, tiny_model, download_cache, monkeypatch, tmp_path
):
    hub = serve(monkeypatch, FakeHub(REPO, tiny_model, download_cache, NEVER_LOADED))
    limit_gb = hub.bytes_of_the_model() / 2 / 1e9
    monkeypatch.setenv("LORA_GUI_MAX_MODEL_GB", str(limit_gb))
    _, ctx = build_app(tmp_path, JobManager())
    with pytest.raises(LoraGuiError) as refused:
        ctx.models.resolve(REPO)
    size, limit = downloads._size_text(hub.bytes_of_the_model()), downloads._size_text(int(limit_gb * 1e9))
    assert str(refused.value) == (
        f"{REPO} is {size} to download, over this server's limit of {limit}: pick a smaller model"
    )
    with pytest.raises(ModelLoadError, match="over this server's limit"):
        load_pipeline(REPO, policy=ctx.models.policy)
    assert hub.fetched == []

    monkeypatch.setenv("LORA_GUI_MAX_MODEL_GB", str(2 * limit_gb))
    family, _ = load_pipeline(ctx.models.resolve(REPO), policy=ctx.models.policy)
    assert family.name == "sd15" and hub.fetched


@pytest.mark.train
def test_on_ones_own_computer_paths_work_as_before(tiny_model, monkeypatch, tmp_path):
    for name in ("SPACE_ID", "LORA_GUI_BASE_MODELS", "LORA_GUI_MAX_MODEL_GB"):
        monkeypatch.delenv(name, raising=False)
    _, ctx = build_app(tmp_path, JobManager())
    policy = ctx.models.policy  # no limits where no stranger calls
    assert (policy.hub_only, policy.allowed, policy.max_bytes) == (BaseModelPolicy().hub_only, (), None)
    monkeypatch.chdir(tiny_model.parent.parent)
    relative = tiny_model.relative_to(tiny_model.parent.parent).as_posix()  # shaped like a Hub id
    for name in (str(tiny_model), relative):
        assert ctx.models.resolve(name) == name
        assert ctx.models.family(name) == "sd15"
    family, _ = load_pipeline(relative, policy=ctx.models.policy)
    assert family.name == "sd15"
