"""A dataset being put together in the app, kept on disk from the first file dropped.

Each browser session gets its own folder, <runs>/.staging/<id>/, in the layout a run trains on:
images with same-name .txt captions. Every caption edit is written at once, so nothing lives only
in the browser, and starting a run writes the run's dataset/ from the folder as it is then
(jobs.JobManager.submit_new). Files here are only ever replaced (a new file renamed over the old
one) or removed, never rewritten in place, which is what lets that dataset/ hold hard links to them.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from lora_gui import data
from lora_gui.atomic import atomic_path, write_text_atomic
from lora_gui.errors import DataError
from lora_gui.owners import EVERYONE, OWNER_FILE, Visitor, write_owner

STAGING_DIR = ".staging"
THUMBNAILS = ".thumbnails"
THUMBNAIL_SIDE = 256
MAX_ZIP_BYTES = 4 << 30  # unpacked; a zip bomb stops here
MAX_ZIP_FILES = 20_000
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class StagedImage:
    relpath: str
    path: Path
    caption: str
    thumbnail: Path | None  # None when the image can't be read
    problem: str  # why it can't be used, "" when it can


@dataclass
class DatasetReport:
    """The checks a person should see before training, from the same scan training will do."""

    resolution: int
    usable: list[data.Example] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)
    unusable: list[data.Skipped] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    too_small: list[data.Example] = field(default_factory=list)


class Staging:
    """The staged dataset of one browser session."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_session(cls, runs_dir: str | Path, session_id: str = "", visitor: Visitor = EVERYONE) -> Staging:
        """The session's staging folder if `visitor` owns it; else a new one, theirs."""
        found = cls.find(runs_dir, session_id, visitor)
        if found is not None:
            return found
        staging = cls(Path(runs_dir) / STAGING_DIR / uuid.uuid4().hex)
        write_owner(staging.folder, visitor.owner)
        return staging

    @classmethod
    def find(cls, runs_dir: str | Path, session_id: str, visitor: Visitor = EVERYONE) -> Staging | None:
        """The session's staging folder if it exists and `visitor` owns it (a browser may remember one that was
        cleaned up; a stranger may name one that is not theirs)."""
        folder = Path(runs_dir) / STAGING_DIR / (session_id or "")
        if not (_SESSION_ID.fullmatch(session_id or "") and folder.is_dir() and visitor.owns_folder(folder)):
            return None
        return cls(folder)

    @property
    def session_id(self) -> str:
        return self.folder.name

    # ---- adding files -------------------------------------------------------------------------
    def add_files(self, paths: Iterable[str | Path]) -> list[str]:
        """Add dropped files: images, .txt captions (matched to images by name) and .zip archives.

        Returns notes about files that were not added, in plain words.
        """
        notes: list[str] = []
        images, captions = [], {}
        for path in map(Path, paths):
            suffix = path.suffix.lower()
            if data.is_ignored(path.name):
                continue
            if suffix == ".zip":
                notes += self._add_zip(path)
            elif suffix in data.ALL_IMAGE_SUFFIXES:
                images.append(path)
            elif suffix == ".txt":
                captions[path.stem] = path
            else:
                notes.append(f"{path.name}: not an image, a .txt caption or a .zip, so it was left out")
        for image in images:
            caption_file = captions.pop(image.stem, None)
            notes += self._add_image(image, image.name, data.read_caption_file(caption_file) if caption_file else None)
        for stem, caption_file in captions.items():
            matches = [item for item in self.items() if PurePosixPath(item.relpath).stem == stem]
            if matches:
                self.set_caption(matches[0].relpath, data.read_caption_file(caption_file))
            else:
                notes.append(f"{caption_file.name}: no image named {stem} to go with it; drop it with its image")
        return notes

    def import_folder(self, folder: str | Path) -> list[str]:
        """Copy a folder's images and captions (same-name .txt or metadata.jsonl/.csv), subfolders too."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise DataError(f"the folder {folder} does not exist; check the path")
        metadata = data.metadata_captions(folder) or {}
        pictures, notes = data.picture_files(folder), []
        for path in pictures:
            relpath = path.relative_to(folder).as_posix()
            caption_file = path.with_suffix(".txt")
            caption = metadata.get(relpath) or (
                data.read_caption_file(caption_file) if caption_file.is_file() else None
            )
            notes += self._add_image(path, relpath, caption)
        return (
            notes if pictures else [f"no images found in {folder.name} (looked for {', '.join(data.IMAGE_SUFFIXES)})"]
        )

    def _add_zip(self, path: Path) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                _extract_zip(path, Path(tmp))
            except (zipfile.BadZipFile, OSError) as error:
                return [f"{path.name}: not a readable .zip file ({error})"]
            except DataError as error:
                return [f"{path.name}: {error}"]
            return self.import_folder(tmp)

    def _add_image(self, source: Path, relpath: str, caption: str | None) -> list[str]:
        """Copy an image in (a byte-identical one already there is kept, a different one with the same
        name gets a new name), with its caption when it has one; a note instead for a kind of picture training
        can't read. Those are never kept: the staging folder is served to the page, where an SVG's script
        would run."""
        if problem := data.format_problem(relpath):
            return [f"{PurePosixPath(relpath).name}: {problem}, so it was left out"]
        target = self.folder / relpath
        number = 1
        while target.exists() and not _same_bytes(target, source):
            number += 1
            target = target.with_name(f"{PurePosixPath(relpath).stem}-{number}{target.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        if caption is not None:
            write_text_atomic(target.with_suffix(".txt"), caption + "\n")
        return []

    # ---- reading ------------------------------------------------------------------------------
    def items(self) -> list[StagedImage]:
        """Every image file dropped so far (usable or not), with its caption and a thumbnail."""
        found = []
        for path in data.picture_files(self.folder):
            relpath = path.relative_to(self.folder).as_posix()
            caption_file = path.with_suffix(".txt")
            caption = data.read_caption_file(caption_file) if caption_file.is_file() else ""
            thumbnail, problem = self._thumbnail(path, relpath)
            found.append(StagedImage(relpath, path, caption, thumbnail, problem))
        return found

    def _thumbnail(self, path: Path, relpath: str) -> tuple[Path | None, str]:
        """A small PNG of the image, made once, or the reason the image can't be used."""
        problem = data.read_header(path).problem
        if problem:
            return None, problem
        thumbnail = self.folder / THUMBNAILS / f"{relpath}.png"
        if thumbnail.is_file() and thumbnail.stat().st_mtime >= path.stat().st_mtime:
            return thumbnail, ""
        try:
            image = data.open_image(path, draft_side=THUMBNAIL_SIDE)
        except data.UnusableImage as problem:
            return None, str(problem)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        with atomic_path(thumbnail) as tmp:
            image.save(tmp, format="PNG", compress_level=1)  # a few kB more, in a fifth of the default's time
        return thumbnail, ""

    def check(self, resolution: int, default_caption: str = "") -> DatasetReport:
        """Count, sizes, missing captions, unusable files, duplicates and too-small images."""
        scan = data.scan_folder(self.folder, default_caption)
        uncaptioned = scan.uncaptioned(default_caption)
        return DatasetReport(
            resolution=resolution,
            usable=scan.examples,
            uncaptioned=[skipped.name for skipped in uncaptioned],
            unusable=[skipped for skipped in scan.skipped if skipped not in uncaptioned],
            duplicates=scan.duplicates(),
            too_small=scan.smaller_than(resolution),
        )

    # ---- editing ------------------------------------------------------------------------------
    def set_caption(self, relpath: str, caption: str) -> None:
        path = self._image(relpath)
        write_text_atomic(path.with_suffix(".txt"), " ".join(caption.split()) + "\n")

    def remove(self, relpath: str) -> None:
        path = self._image(relpath)
        path.unlink()
        path.with_suffix(".txt").unlink(missing_ok=True)
        (self.folder / THUMBNAILS / f"{relpath}.png").unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every picture and caption; the folder stays its owner's."""
        for path in self.folder.iterdir():
            if path.name != OWNER_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def add_trigger_word(self, word: str) -> int:
        """Put `word` in front of every caption that lacks it; returns how many changed."""
        word = word.strip()
        if not word:
            raise DataError("type the trigger word first (a rare made-up word such as sks or ohwx)")
        return self._edit_captions(lambda caption: data.full_caption(caption, word))

    def replace_in_captions(self, find: str, replace: str) -> int:
        if not find:
            raise DataError("type the text to find first")
        return self._edit_captions(lambda caption: caption.replace(find, replace))

    def fill_empty_captions(self, caption: str) -> int:
        if not caption.strip():
            raise DataError("type the caption to use for images that have none")
        return self._edit_captions(lambda current: current or caption)

    def _edit_captions(self, edit) -> int:
        changed = 0
        for item in self.items():
            new = " ".join(edit(item.caption).split())
            if new != item.caption:
                self.set_caption(item.relpath, new)
                changed += 1
        return changed

    def _image(self, relpath: str) -> Path:
        path = (self.folder / relpath).resolve()
        if self.folder.resolve() not in path.parents or not path.is_file():
            raise DataError(f"{relpath} is not in this dataset (was it removed in another tab?)")
        return path


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _extract_zip(path: Path, target: Path) -> None:
    """Unpack a zip, refusing paths that climb out of `target` and archives that unpack too big."""
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > MAX_ZIP_FILES:
            raise DataError(f"it holds {len(members)} files; at most {MAX_ZIP_FILES} are accepted")
        if sum(info.file_size for info in members) > MAX_ZIP_BYTES:
            raise DataError(f"it unpacks to more than {MAX_ZIP_BYTES >> 30} GB")
        for info in members:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or any(map(data.is_ignored, name.parts)):
                continue
            destination = target.joinpath(*name.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, destination.open("wb") as sink:
                shutil.copyfileobj(source, sink)
