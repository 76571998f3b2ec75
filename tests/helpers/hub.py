"""A fake Hugging Face Hub, for huggingface_hub's own code to download from and upload to: nothing leaves this
machine. And a download cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, _snapshot_download
from huggingface_hub.errors import GatedRepoError
from huggingface_hub.file_download import DryRunFileInfo
from huggingface_hub.hf_api import RepoFile

from lora_gui import base_models, downloads

REPO = "someone/gated-model"
COMMIT = "c" * 40
CHUNK = 64 * 1024
# Files an SD 1.x repo holds that from_pretrained never loads: other formats, variants, a checkpoint for other tools.
NEVER_LOADED = {
    "unet/diffusion_pytorch_model.fp16.safetensors": 1_700_000,
    "unet/diffusion_pytorch_model.bin": 3_400_000,
    "text_encoder/model.fp16-00001-of-00002.safetensors": 600_000,
    "text_encoder/flax_model.msgpack": 1_200_000,
    "safety_checker/model.safetensors": 1_200_000,
    "v1-5-pruned.ckpt": 4_000_000,
}


def response(status: int) -> SimpleNamespace:
    return SimpleNamespace(headers={}, status_code=status, request=None, url="")


class FakeHub:
    """The Hub's side of what huggingface_hub does, in memory.

    Downloading one repo, `repo` (the files of the folder `model`, and `never_loaded`: files the repo also holds,
    by size, which from_pretrained never loads) into the download cache `cache`, for `serve`. Gated when `gated`:
    only requests that carry `accepted` get through. Records every request's token in `tokens` and each file
    fetched in `fetched`.

    Uploading, as huggingface_hub.HfApi (the `fake_hub` fixture puts `api` in its place): records each call in
    `calls` (the token it was made with, the repo created, the files uploaded) and raises `fail` when set."""

    def __init__(
        self,
        repo: str = REPO,
        model: Path | None = None,
        cache: Path | None = None,
        never_loaded: dict[str, int] | None = None,
    ):
        self.repo, self.model, self.cache = repo, model, cache
        files = model.rglob("*") if model else ()
        self.model_files = {path.relative_to(model).as_posix(): path for path in files if path.is_file()}
        self.sizes = {name: path.stat().st_size for name, path in self.model_files.items()} | (never_loaded or {})
        self.gated, self.accepted = False, None
        self.tokens: list[object] = []
        self.fetched: list[str] = []
        self.calls: list[tuple] = []
        self.fail: Exception | None = None

    # ---- downloading ----------------------------------------------------------------------------------------
    def check(self, token: object) -> None:
        self.tokens.append(token)
        if self.gated and token != self.accepted:
            raise GatedRepoError(f"Access to {self.repo} is restricted", response=response(401 if token else 403))

    # downloads fetches model_index.json itself
    def hf_hub_download(self, repo_id: str, filename: str, token: object = None) -> str:
        assert repo_id == self.repo
        self.check(token)
        return str(self.model_files[filename])

    # what snapshot_download asks the Hub's API
    def repo_info(self, token: object) -> SimpleNamespace:
        self.check(token)
        return SimpleNamespace(sha=COMMIT)

    def list_repo_tree(self, token: object) -> list[RepoFile]:
        self.check(token)
        return [RepoFile(path=name, size=size, oid=str(index)) for index, (name, size) in enumerate(self.sizes.items())]

    # each file, as snapshot_download fetches it on its threads: in chunks, through the bar it is given
    def fetch_file(self, repo_id: str, *, filename: str, token: object, tqdm_class, dry_run: bool, **kwargs: object):
        self.check(token)
        target = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT / filename
        if dry_run:
            size = self.sizes[filename]
            return DryRunFileInfo(COMMIT, size, filename, str(target), target.exists(), not target.exists())
        self.fetched.append(filename)
        data = self.model_files[filename].read_bytes()
        with tqdm_class(total=len(data), initial=0, unit="B", unit_scale=True, desc=filename) as bar:
            for start in range(0, len(data), CHUNK):
                time.sleep(0.005)
                bar.update(len(data[start : start + CHUNK]))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.model_files[filename], target)
        return str(target)

    def bytes_of_the_model(self) -> int:
        return sum(self.sizes[name] for name in self.model_files)

    # ---- uploading: huggingface_hub.HfApi(token=...) and the two calls a push makes --------------------------
    def api(self, token=None) -> FakeHub:
        self.calls.append(("init", token))
        return self

    def create_repo(self, repo_id, private=False, exist_ok=False):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
        from huggingface_hub.utils import filter_repo_objects

        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        self.calls.append(("upload", repo_id, sorted(filter_repo_objects(files, allow_patterns=allow_patterns))))


def serve(monkeypatch: pytest.MonkeyPatch, fake: FakeHub) -> FakeHub:
    """base_models and downloads go online, to `fake`; huggingface_hub itself stays offline, so from_pretrained then
    loads from the download cache as it would after a real download, and nothing else can reach the network."""
    for module in (base_models, downloads):
        monkeypatch.setattr(module, "constants", SimpleNamespace(HF_HUB_OFFLINE=False))
    monkeypatch.setattr(downloads, "get_token", lambda: None)  # no Hugging Face login on this computer
    monkeypatch.setattr(downloads, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(downloads, "REPORT_EVERY", 0.01)
    monkeypatch.setattr(
        HfApi, "repo_info", lambda api, repo_id, token=None, **kwargs: fake.repo_info(token or api.token)
    )
    monkeypatch.setattr(HfApi, "list_repo_tree", lambda api, repo_id, **_: fake.list_repo_tree(api.token))
    monkeypatch.setattr(_snapshot_download, "hf_hub_download", fake.fetch_file)
    return fake


def push_here(monkeypatch: pytest.MonkeyPatch, fake: FakeHub) -> FakeHub:
    """Uploads (huggingface_hub.HfApi) go to `fake`, with huggingface_hub online as a push needs it."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return fake


def in_download_cache(cache: Path, repo: str, folder: Path) -> None:
    """A diffusers model folder put in a Hugging Face download cache as `repo`, laid out as huggingface_hub does."""
    revision, stored = "0" * 40, cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, stored / "snapshots" / revision)
    (stored / "refs").mkdir()
    (stored / "refs" / "main").write_text(revision)
