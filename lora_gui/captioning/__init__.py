"""Captions for the user's pictures, written by a captioning model: one file per kind of captioner behind the
`Captioner` interface (`florence.py`: Florence-2, sentences for photos; `wd_tagger.py`: SmilingWolf's WD taggers,
booru tags for anime and illustration), and the one pass that captions a folder of pictures.

A captioner is loaded from a Hub id (downloaded once, with its progress told) or a local folder in the same
layout, which is how the tests load their tiny random-weight captioners through the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from PIL import Image

from lora_gui.atomic import atomic_folder
from lora_gui.downloads import DownloadProgress, HubToken
from lora_gui.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class CaptionerInfo:
    """What the app shows about a captioner before anything is downloaded."""

    name: str  # the CLI's --captioner value and the app's menu value: "florence2-base", "wd-tagger"
    title: str  # "Florence-2 base: sentences, for photos"
    repo_id: str  # where its weights come from on the Hub
    download_mb: int  # what the first use downloads, shown beside its name
    writes: str  # "sentences" or "tags"


class Captioner(ABC):
    """A loaded captioning model. `caption` takes pictures (RGB) and gives one caption each; `close` frees its
    memory (a GPU's especially), after which it is not used again."""

    infos: ClassVar[tuple[CaptionerInfo, ...]]  # the named variants this class loads (Florence-2 base and large)
    runs_on: str = "the CPU"  # or "the GPU": where it ended up, for the user to read

    @classmethod
    @abstractmethod
    def load(
        cls,
        info: CaptionerInfo,
        source: str | Path | None = None,
        device: str = "cpu",
        token: HubToken = None,
        on_progress: Callable[[DownloadProgress], None] | None = None,
        **options: object,
    ) -> Captioner:
        """Load `info`'s model from `source` (a local folder in the model's own layout), else from its Hub id
        (downloaded the first time, its progress told to `on_progress`)."""

    @abstractmethod
    def caption(self, images: list[Image.Image]) -> list[str]: ...

    def close(self) -> None:  # noqa: B027 (a captioner holding nothing to free needs no override)
        """Free the model's memory."""


def model_folder(
    info: CaptionerInfo,
    source: str | Path | None,
    files: list[str],
    what: str,
    token: HubToken = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
) -> tuple[Path, str]:
    """Where a captioner's `files` are, and the Hub repo they came from ("" for a local folder): `source` (a
    folder, or another such captioner's Hub id), else `info`'s Hub repo, downloaded the first time. `what` names
    the captioner in messages ("Florence-2", "tagger")."""
    from lora_gui.downloads import NotDownloaded, download_files
    from lora_gui.model_policy import is_hub_id

    repo_id = info.repo_id
    if source is not None and str(source).strip():
        folder = Path(source).expanduser()
        if folder.is_dir():
            return folder, ""
        if not is_hub_id(str(source).strip()):
            raise ModelLoadError(f"the {what} folder {folder} does not exist; check the path")
        repo_id = str(source).strip()
    try:
        return download_files(repo_id, files, token, on_progress), repo_id
    except NotDownloaded:
        raise NotDownloaded(
            f"{info.title.split(':')[0]} must be downloaded once ({info.download_mb:,} MB from {repo_id}), and this "
            "computer is offline or can't reach Hugging Face: connect to the internet and try again (after that it "
            "works offline)"
        ) from None


def _registry() -> dict[str, tuple[type[Captioner], CaptionerInfo]]:
    from lora_gui.captioning.florence import Florence2
    from lora_gui.captioning.wd_tagger import WdTagger

    return {info.name: (kind, info) for kind in (Florence2, WdTagger) for info in kind.infos}


def captioner_infos() -> list[CaptionerInfo]:
    """Every captioner a user can pick, in menu order."""
    return [info for _, info in _registry().values()]


def load_captioner(name: str, **kwargs: object) -> Captioner:
    """The captioner named `name` (see `captioner_infos`), loaded as `Captioner.load` says."""
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"there is no captioner named {name!r}; choose one of: {', '.join(registry)}")
    kind, info = registry[name]
    return kind.load(info, **kwargs)  # type: ignore[arg-type]


def ensure_tiny_captioner(folder: Path) -> Path:
    """The tiny random tagger in `folder`, written the first time it is asked for (beside it, then renamed into
    place, so a half-written one is never loaded): what the offline demo and the tests caption with."""
    from lora_gui.captioning.wd_tagger import write_tiny

    folder = Path(folder)
    if folder.is_dir():
        return folder
    try:
        with atomic_folder(folder, replace=False) as written:
            write_tiny(written)
    except OSError:
        if not folder.is_dir():  # unless another caller's copy won the race
            raise
    return folder
