"""Who owns what, as each handler is told: an app's one user sees everything; several --auth users see only their
own runs; on a Space, a visitor signed in with Hugging Face is their account (and keeps what they made before
signing in, and pushes with their sign-in), anyone else the hash of a secret their browser keeps."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest
from helpers.runs import quick_config

from lora_gui.demo import write_demo_dataset
from lora_gui.errors import ConfigError, LoraGuiError
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE, Visitor, anonymous, app_secret, read_owner, signed_in, user
from lora_gui.staging import Staging
from lora_gui.training import train
from lora_gui.ui.app import build_app, parse_auth, restore
from lora_gui.ui.model_choices import TINY_CHOICE
from lora_gui.ui.runs import push


def request(username: str | None = None, session: str = "a-session") -> SimpleNamespace:
    return SimpleNamespace(username=username, session_hash=session)


def owned_run(ctx, name: str, owner: str, tiny_model, photos) -> None:
    train(quick_config(tiny_model, photos, max_steps=1, sample_every=0), ctx.runs_dir / name)
    (ctx.runs_dir / name / ".owner").write_text(owner + "\n")


@pytest.fixture
def space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/lora-trainer")
    monkeypatch.delenv("LORA_GUI_ALLOW_PATHS", raising=False)


@pytest.mark.train
def test_the_one_user_of_an_unshared_app_owns_everything(tmp_path, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    _, ctx = build_app(tmp_path, JobManager(), users=("me",))
    assert ctx.visitor(request("me")) == EVERYONE


@pytest.mark.train
def test_several_auth_users_each_see_only_their_own_runs(tmp_path, monkeypatch, tiny_model, photos):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert parse_auth("ann:one, bob:two") == [("ann", "one"), ("bob", "two")]
    with pytest.raises(ConfigError, match="names a user twice"):
        parse_auth("ann:one,ann:two")
    _, ctx = build_app(tmp_path, JobManager(), users=("ann", "bob"))
    ann, bob = ctx.visitor(request("ann")), ctx.visitor(request("bob"))
    assert ann.owner == user("ann") and bob.owner == user("bob")
    owned_run(ctx, "anns-run", ann.owner, tiny_model, photos)

    assert [summary.name for summary in ctx.folders.runs_of(ann)] == ["anns-run"]
    assert ctx.folders.runs_of(bob) == []
    with pytest.raises(LoraGuiError, match="there is no run named anns-run"):
        ctx.folders.run("anns-run", bob)
    assert ctx.folders.run("anns-run", ann).name == "anns-run"


@pytest.mark.train
def test_an_anonymous_visitor_is_the_hash_of_their_browsers_secret_or_else_of_their_session(tmp_path, space):
    _, ctx = build_app(tmp_path, JobManager())
    assert ctx.visitor(request(), owner=anonymous("secret")).owner == anonymous("secret")
    # An API client that never loaded the page: one id per session, the same on every call.
    first, again, other = (ctx.visitor(request(session=s)) for s in ("one", "one", "two"))
    assert first == again and first.owner != other.owner and first.owner.startswith("anon:")
    assert "secret" not in anonymous("secret") and len(anonymous("secret")) == len("anon:") + 64


@pytest.mark.train
def test_signing_in_keeps_what_was_made_before_and_pushes_with_the_sign_in(
    tmp_path, space, tiny_model, photos, fake_hub
):
    _, ctx = build_app(tmp_path, JobManager())
    before = anonymous("the browser's secret")
    owned_run(ctx, "made-before", before, tiny_model, photos)
    profile, token = SimpleNamespace(username="ann"), SimpleNamespace(token="hf_from_sign_in")
    ann = ctx.visitor(request(), owner=before, profile=profile, token=token)
    assert ann.owner == signed_in("ann") and "hf_from_sign_in" not in repr(ann)
    assert [summary.name for summary in ctx.folders.runs_of(ann)] == ["made-before"]

    pushed = push(ctx, ann, run_pick="made-before", hub_repo="ann/lora", hub_token="", hub_private=True)
    assert "Uploaded" in pushed["hub_notice"]
    assert fake_hub.calls[0] == ("init", "hf_from_sign_in")
    stranger = ctx.visitor(request(session="another"))
    refused = push(ctx, stranger, run_pick="made-before", hub_repo="x/lora", hub_token="hf_typed", hub_private=True)
    assert "There is no run named made-before" in refused["hub_notice"]


@pytest.mark.train
def test_a_reloaded_page_finds_its_visitors_pictures_and_run_and_a_strangers_page_finds_neither(tmp_path, space):
    _, ctx = build_app(tmp_path, JobManager())
    page = dict(dataset_version=0, resolution=64, default_caption="")
    first = restore(ctx, ctx.visitor(request()), owner_key="", remembered="", my_presets={}, **page)
    key = first["owner_key"]
    assert len(key) >= 32 and first["owner"] == anonymous(key)
    a = ctx.visitor(request(session="after-a-reload"), owner=first["owner"])

    staging = ctx.folders.staging("", a)
    write_demo_dataset(staging.folder, count=2, size=(64, 64))
    tiny = ctx.models.resolve(TINY_CHOICE)  # the app's own model: the only path a Space's runs load
    config = quick_config(tiny, staging.folder, max_steps=10_000, sample_prompts=["my secret prompt"])
    job = ctx.engine.jobs.submit_new(config, ctx.runs_dir / "a-run", staging.folder, owner=a.owner)
    try:
        reloaded = restore(
            ctx, ctx.visitor(request()), owner_key=key, remembered=staging.session_id, my_presets={}, **page
        )
        assert reloaded["owner"] == a.owner and reloaded["session"] == staging.session_id
        assert reloaded["sample_prompts"] == "my secret prompt"

        stranger = restore(
            ctx, ctx.visitor(request(session="b")), owner_key="", remembered=staging.session_id, my_presets={}, **page
        )
        assert stranger["owner"] != a.owner
        assert "session" not in stranger and "sample_prompts" not in stranger
        assert Staging.find(ctx.runs_dir, staging.session_id, ctx.visitor(request(), owner=stranger["owner"])) is None
    finally:
        ctx.engine.jobs.stop(job.job_id)
        ctx.engine.jobs.wait(job.job_id, timeout=120)
    assert read_owner(ctx.runs_dir / "a-run") == a.owner


@pytest.mark.unit
def test_the_key_that_encrypts_what_browsers_keep_outlives_the_app(tmp_path):
    first = app_secret(tmp_path)
    assert app_secret(tmp_path) == first and len(first) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / ".app-secret").st_mode) == 0o600


@pytest.mark.unit
def test_a_visitor_owns_only_their_own_ids():
    ann = Visitor(owner=signed_in("ann"), also=(anonymous("x"),))
    assert ann.owns(signed_in("ann")) and ann.owns(anonymous("x"))
    assert not ann.owns(signed_in("bob")) and not ann.owns("local")
    assert EVERYONE.owns("anything")
