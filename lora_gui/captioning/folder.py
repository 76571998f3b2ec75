"""One captioning pass over a folder of pictures: a caption for each picture that has none (or for every one, to
caption them all again), written into the picture's same-name .txt file, the layout of the app's staging folder and
kohya's, which training reads.

Captions are written into .txt files only: `data` reads a folder's metadata.jsonl/.csv but has no writer for it.
A picture whose caption is in that metadata file keeps it (training would read it before any .txt); one with no
metadata caption gets a .txt, which training then reads.

Nothing the user typed is lost: each caption file is read as the pass starts, and one that changed since (its
caption edited in the app while the pass ran) is kept as the user left it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from lora_gui import data
from lora_gui.atomic import write_text_atomic
from lora_gui.captioning import Captioner, load_captioner
from lora_gui.data import Skipped
from lora_gui.downloads import DownloadProgress
from lora_gui.errors import ConfigError, DataError, LoraGuiError

if TYPE_CHECKING:
    from lora_gui.downloads import DownloadProgress
    from lora_gui.gpu_owner import GpuOwner

log = logging.getLogger(__name__)

# Pictures are decoded with at least this many pixels a side (a JPEG at a fraction of its size, which costs a
# fraction of the time): more than the captioners look at (448 for the WD taggers, 768 for Florence-2).
DRAFT_SIDE = 1024
IN_METADATA = "its caption is in the folder's metadata file, which captioning does not rewrite (edit it there)"
NOTHING_CAME_OUT = "the captioner gave no caption (a tagger found no tag above its threshold: try a lower one)"
GONE = "could not be read (it was moved or deleted during captioning)"


@dataclass
class CaptionPass:
    """What a captioning pass did, each picture by its path in the folder."""

    captioned: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # captions the user edited during the pass: theirs kept
    skipped: list[Skipped] = field(default_factory=list)  # pictures left as they were, each with its reason
    stopped: bool = False  # stopped when asked, before the end

    def summary(self) -> str:
        """For instance "Captioned 5 pictures; kept 1 caption edited during captioning; skipped 1."."""
        parts = [f"Captioned {_count(len(self.captioned), 'picture')}"]
        if self.kept:
            parts.append(f"kept {_count(len(self.kept), 'caption')} edited during captioning")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}")
        return "; ".join(parts) + ("; stopped before the end." if self.stopped else ".")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def pictures_to_caption(folder: Path, *, overwrite: bool = False) -> list[str]:
    """The pictures of `folder` a pass would caption (by path in the folder): those without a caption, or with
    `overwrite` all of them, less those whose caption is in a metadata file and those training can't use (by
    their headers)."""
    return [path.relative_to(folder).as_posix() for path in _plan(Path(folder), overwrite)[0]]


def caption_folder(
    folder: Path,
    captioner: Captioner,
    *,
    overwrite: bool = False,
    prefix: str = "",
    batch_size: int = 4,
    on_caption: Callable[[str, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionPass:
    """Caption the pictures of `folder` (subfolders too) that have no caption (a missing or empty .txt), or with
    `overwrite` every one, `batch_size` at a time. `prefix` (a trigger word) goes in front of each caption, once.
    `on_caption(relpath, caption)` hears each caption as it is written; `should_stop` is asked before each batch.
    A caption file changed since the pass began is kept as it is."""
    folder = Path(folder).expanduser()
    if batch_size < 1:
        raise ConfigError(f"batch size must be 1 or more (got {batch_size})")
    todo, skipped = _plan(folder, overwrite)
    result = CaptionPass(skipped=skipped)
    as_found = {path: _caption_bytes(path) for path in todo}
    for start in range(0, len(todo), batch_size):
        if should_stop is not None and should_stop():
            result.stopped = True
            break
        batch = [(path, image) for path in todo[start : start + batch_size] if (image := _open(path, folder, result))]
        captions = captioner.caption([image for _, image in batch]) if batch else []
        for (path, _), caption in zip(batch, captions, strict=True):
            relpath = path.relative_to(folder).as_posix()
            text = data.full_caption(" ".join(caption.split()), prefix)
            if not text:
                result.skipped.append(Skipped(relpath, NOTHING_CAME_OUT))
            elif _caption_bytes(path) != as_found[path]:
                # Edited while the pass ran: the user's words win. (The window between this look and the write
                # below is a few microseconds; the app's own writes are atomic renames, seen whole or not at all.)
                result.kept.append(relpath)
            else:
                write_text_atomic(path.with_suffix(".txt"), text + "\n")
                result.captioned.append(relpath)
                if on_caption is not None:
                    on_caption(relpath, text)
    return result


def _plan(folder: Path, overwrite: bool) -> tuple[list[Path], list[Skipped]]:
    """The pictures to caption, and those passed over with their reasons."""
    if not folder.is_dir():
        raise DataError(f"the folder {folder} does not exist; check the path")
    metadata = data.metadata_captions(folder) or {}
    todo, skipped = [], []
    for path in data.picture_files(folder):
        relpath = path.relative_to(folder).as_posix()
        if problem := data.read_header(path).problem:  # as training would find it: it would not use the picture
            skipped.append(Skipped(relpath, problem))
        elif metadata.get(relpath):
            if overwrite:
                skipped.append(Skipped(relpath, IN_METADATA))
        elif overwrite or not _has_caption(path):
            todo.append(path)
    return todo, skipped


def _has_caption(path: Path) -> bool:
    caption_file = path.with_suffix(".txt")
    return caption_file.is_file() and bool(data.read_caption_file(caption_file))


def _caption_bytes(path: Path) -> bytes | None:
    """The picture's caption file as it is on disk; None when there is none."""
    try:
        return path.with_suffix(".txt").read_bytes()
    except FileNotFoundError:
        return None


def _open(path: Path, folder: Path, result: CaptionPass) -> Image.Image | None:
    """The picture decoded, or None with the reason it can't be added to `result.skipped`."""
    try:
        return data.open_image(path, draft_side=DRAFT_SIDE)
    except data.UnusableImage as problem:
        reason = str(problem)
    except OSError:
        reason = GONE
    result.skipped.append(Skipped(path.relative_to(folder).as_posix(), reason))
    return None


def caption_in_background(
    name: str,
    folder: Path,
    *,
    should_stop: Callable[[], bool],
    gpu: GpuOwner,
    overwrite: bool = False,
    prefix: str = "",
    **load: object,
) -> Iterator[str | DownloadProgress | tuple[str, str] | CaptionPass | LoraGuiError]:
    """A captioning pass run on a thread of its own, told as it goes: why it runs on the processor where a run has
    the GPU (a sentence), its download's progress, where the captioner runs (a sentence), each caption written as
    (relpath, caption), and last what the pass did, or the error that ended it. The captioner loads where `gpu`
    gives the pass its turn, which it holds until its memory is freed at the end; `load` is handed to
    `load_captioner`."""
    told: queue.Queue[object] = queue.Queue()
    ended = object()

    def work() -> None:
        try:
            with gpu.captioning_turn() as turn:
                if turn.why:
                    told.put(turn.why)
                captioner = load_captioner(name, device=turn.device, on_progress=told.put, **load)
                try:
                    told.put(f"Captioning on {captioner.runs_on}…")
                    told.put(
                        caption_folder(
                            folder,
                            captioner,
                            overwrite=overwrite,
                            prefix=prefix,
                            on_caption=lambda relpath, caption: told.put((relpath, caption)),
                            should_stop=should_stop,
                        )
                    )
                finally:
                    captioner.close()
        except LoraGuiError as error:
            told.put(error)
        except Exception as error:  # a bug or a broken model: said, rather than the page waiting forever
            log.exception("Captioning failed")
            told.put(LoraGuiError(f"captioning failed on an unexpected error: {type(error).__name__}: {error}"))
        finally:
            told.put(ended)

    threading.Thread(target=work, name="lora-gui-captioning", daemon=True).start()
    while (event := told.get()) is not ended:
        yield event  # type: ignore[misc]
