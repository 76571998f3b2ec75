"""Hub downloads people can follow: a model's files (those from_pretrained loads) or any other repo's (a
captioner's), with a token given for them, their progress in bytes and files reported twice a second, a size limit
checked by a dry run before any file is fetched, and the Hub's refusals (gated, unknown, a refused token) said with
what to do."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants, get_token, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from tqdm.std import tqdm

from lora_gui.errors import ModelLoadError

log = logging.getLogger(__name__)

TOKENS_PAGE = "https://huggingface.co/settings/tokens"
# Seconds between download progress reports: often enough to look alive, seldom enough to cost nothing.
REPORT_EVERY = 0.5
# Weight files (a LoRA, a checkpoint) in PyTorch's pickle format, which can run code as it is read: never
# downloaded, refused unless the user allows them. Here, apart from torch, for the app's upload boxes too.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Files of a model's component folders that from_pretrained never loads: it takes safetensors over pickles and
# other frameworks' weights, and the plain weights over variants (fp16, non-EMA). Together, gigabytes.
NOT_LOADED_FILES = [
    *(f"*{suffix}" for suffix in PICKLE_SUFFIXES),
    *("*.msgpack", "*.h5", "*.pb", "*.onnx", "*.onnx_data", "*.gguf"),
    "*openvino*",
    *(f"*.{variant}{separator}*" for variant in ("fp16", "bf16", "non_ema") for separator in ".-"),
]
NOT_LOADED_COMPONENTS = ("safety_checker",)  # pipelines load without it here (see base_models._from_pretrained)
# As huggingface_hub takes it: a token; None for this computer's login (HF_TOKEN, `hf auth login`); False for none.
HubToken = str | bool | None
# What a download and a load both say of a repo the Hub does not know.
NOT_ON_THE_HUB = (
    "no such model on the Hub (or it is private): check the spelling (owner/name, as on the model's page); "
    "a private model needs a Hugging Face token of an account that can see it"
)


def gated_advice(repo_id: str, token: HubToken) -> str:
    """What to do about a gated model: accept its licence on its page, and give a token of that account."""
    page = f"https://huggingface.co/{repo_id}"
    if get_token() if token is None else token:
        return (
            f"accept its licence on {page}, signed in to the Hugging Face account the token belongs to, and try "
            f"again (a fine-grained token also needs read access to the public gated models you can access: "
            f"{TOKENS_PAGE})"
        )
    return (
        f"accept its licence on {page} (signed in to Hugging Face), then give a Hugging Face token with read "
        f"access ({TOKENS_PAGE}) and try again: in the app, in 'Hugging Face token' (Train tab, Generate tab); "
        "on the command line, as the HF_TOKEN environment variable or with `hf auth login`"
    )


@dataclass(frozen=True)
class DownloadProgress:
    """How far a model's download has got. Plain data, so it travels in events."""

    repo: str
    done_bytes: int
    total_bytes: int
    files_done: int
    files_total: int

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0

    def summary(self) -> str:
        """For instance "3.2 of 33.7 GB · 5 of 23 files"."""
        scale, unit = _unit(self.total_bytes)
        return (
            f"{self.done_bytes / scale:.1f} of {self.total_bytes / scale:.1f} {unit} · "
            f"{self.files_done} of {self.files_total} files"
        )

    def size(self) -> str:
        """For instance "33.7 GB in 23 files"."""
        scale, unit = _unit(self.total_bytes)
        return f"{self.total_bytes / scale:.1f} {unit} in {self.files_total} files"


def _size_text(size: int) -> str:
    scale, unit = _unit(size)
    return f"{size / scale:.1f} {unit}"


def _unit(size: int) -> tuple[float, str]:
    return next(((scale, unit) for scale, unit in ((1e9, "GB"), (1e6, "MB")) if size >= scale), (1e3, "kB"))


def download(
    repo_id: str,
    token: HubToken = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
    configs_only: tuple[str, ...] = (),
    max_bytes: int | None = None,
) -> None:
    """Put the files from_pretrained loads of a Hub model into the download cache (nothing to do offline).

    `on_progress` hears how far it got about twice a second, from another thread (one at a time), and last the
    total; without it, huggingface_hub draws its own progress bars on the terminal. A gated or unknown model, or
    a refused token, raises ModelLoadError. Any other failure (no connection, a full disk) is left to
    from_pretrained, which loads what is cached or says what failed. `configs_only`: components whose weights
    come from elsewhere. A download over `max_bytes` is refused before any file is fetched.
    """
    if constants.HF_HUB_OFFLINE:
        return
    try:
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", token=token)).read_text("utf-8"))
        files = _download_patterns(index, configs_only)
        planned = _planned_files(repo_id, token, files) if on_progress or max_bytes is not None else []
        if max_bytes is not None:
            _check_size(repo_id, planned, max_bytes)
        if on_progress is None:
            snapshot_download(repo_id, token=token, **files)
        elif any(file.will_download for file in planned):
            _download_reporting(repo_id, token, files, planned, on_progress)
    except Exception as error:
        refusal = _refusal(error, repo_id, token)
        if refusal is not None:
            raise refusal from None
        # No connection, a full disk...: from_pretrained loads what is in the download cache, or says what failed.
        log.warning("Downloading %s failed (%s); loading it tries what is cached", repo_id, error)


def check_download_size(repo_id: str, max_bytes: int, token: HubToken = None) -> None:
    """Refuse a Hub model whose download would be over `max_bytes`, read from the Hub by a dry run before any file
    is fetched; a gated or unknown model, or a refused token, is refused as `download` refuses it."""
    if constants.HF_HUB_OFFLINE:
        return
    try:
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", token=token)).read_text("utf-8"))
        _check_size(repo_id, _planned_files(repo_id, token, _download_patterns(index, ())), max_bytes)
    except Exception as error:
        refusal = _refusal(error, repo_id, token)
        if refusal is not None:
            raise refusal from None
        # Unmeasured (no connection...): the download, which measures again before fetching, has the last word.
        log.warning("Could not measure %s's download (%s)", repo_id, error)


def download_files(
    repo_id: str,
    allow_patterns: list[str],
    token: HubToken = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
) -> Path:
    """The folder of a Hub repo's files that match `allow_patterns` (a captioner's), downloaded into the download
    cache the first time, its progress told to `on_progress` as `download` tells it. Offline (HF_HUB_OFFLINE), or
    when the download fails, the cached files; none cached is a ModelLoadError saying to connect once. A gated or
    unknown repo, or a refused token, is said as for a base model."""
    files = {"allow_patterns": list(allow_patterns)}
    failure = "this computer is set to work offline"
    if not constants.HF_HUB_OFFLINE:
        try:
            if on_progress is None:
                return Path(snapshot_download(repo_id, token=token, **files))
            planned = _planned_files(repo_id, token, files)
            if any(file.will_download for file in planned):
                _download_reporting(repo_id, token, files, planned, on_progress)
        except Exception as error:
            refusal = _refusal(error, repo_id, token)
            if refusal is not None:
                raise refusal from None
            # No connection, a full disk...: a copy downloaded before still does.
            failure = f"downloading it failed ({(str(error) or type(error).__name__).splitlines()[0]})"
            log.warning("Downloading %s failed (%s); trying the download cache", repo_id, error)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **files))
    except Exception:
        raise NotDownloaded(
            f"{repo_id} is not in this computer's download cache and {failure}: it downloads once, the first time "
            "it is used with an internet connection, and works offline after that"
        ) from None


class NotDownloaded(ModelLoadError):
    """Files that must be downloaded once, which this computer could not download now (offline, or no connection)."""


def _refusal(error: Exception, repo_id: str, token: HubToken) -> ModelLoadError | None:
    """The Hub's no to a model (gated, unknown, or the token refused), said plainly; None for any other failure."""
    if isinstance(error, ModelLoadError):  # already said plainly (too big to download)
        return error
    if isinstance(error, GatedRepoError):
        return ModelLoadError(f"{repo_id} is gated: {gated_advice(repo_id, token)}")
    if isinstance(error, RepositoryNotFoundError):
        return ModelLoadError(f"could not load {repo_id}: {NOT_ON_THE_HUB}")
    if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code in (401, 403):
        return ModelLoadError(
            f"Hugging Face refused the token for {repo_id} (it may be mistyped, deleted, or without read access): "
            f"make one with read access at {TOKENS_PAGE} and give it again"
        )
    return None


def _download_patterns(index: dict[str, Any], configs_only: tuple[str, ...]) -> dict[str, list[str]]:
    """Which files of a pipeline's repo to download: those from_pretrained would. That is its components' folders
    (those model_index.json names), and the weights in any other folder (SDXL's vae_1_0), which from_pretrained
    fetches too; without what it never loads."""
    components = [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and None not in value
    ]
    return {
        "allow_patterns": [
            "model_index.json",
            *(f"{name}/*.json" if name in configs_only else f"{name}/*" for name in components),
            "*/diffusion_pytorch_model*.safetensors",
            "*/model*.safetensors",
        ],
        "ignore_patterns": [
            *NOT_LOADED_FILES,
            *(f"{name}/*" for name in NOT_LOADED_COMPONENTS),
            *(f"{name}/*.safetensors" for name in configs_only),
        ],
    }


def _planned_files(repo_id: str, token: HubToken, files: dict[str, Any]) -> list[Any]:
    """A download's files, with their sizes and whether each is cached yet, as the Hub lists them (a dry run:
    nothing is fetched)."""
    return snapshot_download(repo_id, token=token, dry_run=True, tqdm_class=_SilentBar, **files)


def _missing_bytes(planned: list[Any]) -> int:
    return sum(file.file_size or 0 for file in planned if file.will_download)


def _check_size(repo_id: str, planned: list[Any], max_bytes: int) -> None:
    size = _missing_bytes(planned)
    if size > max_bytes:
        raise ModelLoadError(
            f"{repo_id} is {_size_text(size)} to download, over this server's limit of {_size_text(max_bytes)}: "
            "pick a smaller model"
        )


def _download_reporting(
    repo_id: str,
    token: HubToken,
    files: dict[str, Any],
    planned: list[Any],
    on_progress: Callable[[DownloadProgress], None],
) -> None:
    """snapshot_download of the `planned` files, its progress told to `on_progress` twice a second by a thread of
    its own, and last the total, from this thread once every file is there. The download itself stays on this
    thread, where Ctrl+C stops it as huggingface_hub means it to."""
    # The missing files' sizes, known before the download, make the total known from the start.
    counter = _DownloadCounter(repo_id, _missing_bytes(planned), len(planned))
    log.info("Downloading %s: %s", repo_id, counter.progress().size())
    downloaded = threading.Event()
    reporter = threading.Thread(
        target=_report_until, args=(downloaded, counter, on_progress), name="download-progress", daemon=True
    )
    reporter.start()
    try:
        snapshot_download(repo_id, token=token, tqdm_class=counter.bar_class(), **files)
    finally:
        downloaded.set()
        reporter.join()
    on_progress(counter.finished())


def _report_until(
    downloaded: threading.Event, counter: _DownloadCounter, on_progress: Callable[[DownloadProgress], None]
) -> None:
    while True:
        on_progress(counter.progress())
        if downloaded.wait(REPORT_EVERY):
            return


class _DownloadCounter:
    """Reads the progress bars snapshot_download keeps: the bytes written to disk ("Reconstructing": they add up to
    the files' sizes, while its transfer bar counts network bytes, fewer after deduplication) and the files."""

    def __init__(self, repo_id: str, total_bytes: int, files_total: int):
        self.repo_id, self.total_bytes, self.files_total = repo_id, total_bytes, files_total
        self.bytes_bar: tqdm | None = None
        self.files_bar: tqdm | None = None

    def bar_class(self) -> type[tqdm]:
        return type("CountingBar", (_CountingBar,), {"counter": self})

    def add(self, bar: tqdm) -> None:
        if bar.unit != "B":
            self.files_bar = bar
        elif str(bar.desc).startswith("Reconstructing"):
            self.bytes_bar = bar

    def progress(self) -> DownloadProgress:
        done_bytes = int(self.bytes_bar.n) if self.bytes_bar else 0
        files_done = int(self.files_bar.n) if self.files_bar else 0
        return DownloadProgress(
            self.repo_id,
            min(done_bytes, self.total_bytes),
            self.total_bytes,
            min(files_done, self.files_total),
            self.files_total,
        )

    def finished(self) -> DownloadProgress:
        return DownloadProgress(self.repo_id, self.total_bytes, self.total_bytes, self.files_total, self.files_total)


class _Nowhere(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


class _SilentBar(tqdm):
    """A tqdm bar that draws nothing and counts as usual."""

    monitor_interval = 0  # no thread watching how often it draws: it never does

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "file": _Nowhere()})


class _CountingBar(_SilentBar):
    """A silent bar made known to its download's `_DownloadCounter`."""

    counter: _DownloadCounter

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.counter.add(self)
