"""A dataset being put together in the app, kept on disk from the first file dropped.

Each browser session gets its own folder, <runs>/.staging/<id>/, in the layout a run trains on: images with same-name
.txt captions, and an edit LoRA's "before" pictures in .before/ under their "after" pictures' names (hidden, so the
walk over the pictures never enters it; kept with the same owner, limits and expiry). Every caption edit is written at
once, so nothing lives only in the browser, and starting a run writes the run's dataset/ (and control/) from the folder
as it is then (jobs.JobManager.submit_new). Files here are only ever replaced (a new file renamed over the old one) or
removed, never rewritten in place, which is what lets that dataset/ hold hard links to them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from lora_gui import data, run_dataset
from lora_gui.atomic import atomic_path, write_text_atomic
from lora_gui.errors import DataError
from lora_gui.limits import Limits, expire_untouched, format_size
from lora_gui.owners import EVERYONE, OWNER_FILE, Visitor, write_owner
from lora_gui.run_dataset import pair_key
from lora_gui.staging_pairs import add_pairs, before_places, pair_halves

STAGING_DIR = ".staging"
THUMBNAILS = ".thumbnails"
# An edit's "before" pictures, each named as its "after" picture (run_dataset.pair_with_controls matches them).
BEFORE_DIR = ".before"
# In a folder of the demo's pictures: the id of the visitor's own folder the demo set aside ("" for none), so Back to
# my pictures finds it after a reload too (the browser remembers the folder shown, and the server this link).
DEMO_MARK = ".demo"
THUMBNAIL_SIDE = 256
MAX_ZIP_BYTES = 4 << 30  # unpacked; a zip bomb stops here
MAX_ZIP_FILES = 20_000
# Longer than any text encoder reads (T5's 512 tokens are about 2,000 characters): a caption past it is a mistake or
# a way to fill the disk.
MAX_CAPTION_CHARS = 4000
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def expire_staging(runs_dir: Path, limits: Limits, now: float | None = None) -> list[str]:
    """Delete the staging folders nobody has touched for the limits' `staging_days`; returns their ids."""
    return expire_untouched(Path(runs_dir) / STAGING_DIR, limits.staging_days, now)


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
    # Edit pairs, when "before" pictures were given (`usable` is then the pairs): the after pictures left out for
    # want of a before picture, the before pictures no after picture is named as, the pairs of two shapes (each
    # "name: before WxH, after WxH").
    paired: bool = False
    no_before: list[str] = field(default_factory=list)
    no_after: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)


class Staging:
    """The staged dataset of one browser session."""

    def __init__(self, folder: str | Path, limits: Limits | None = None, visitor: Visitor = EVERYONE):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limits = limits  # what one visitor may stage on a shared server; None: no limits (the app sets it)
        self.visitor = visitor  # whose it is: the quota counts all their staging folders

    @classmethod
    def for_session(cls, runs_dir: str | Path, session_id: str = "", visitor: Visitor = EVERYONE) -> Staging:
        """The session's staging folder if `visitor` owns it; else a new one, theirs."""
        found = cls.find(runs_dir, session_id, visitor)
        if found is not None:
            return found
        staging = cls(Path(runs_dir) / STAGING_DIR / uuid.uuid4().hex, visitor=visitor)
        write_owner(staging.folder, visitor.owner)
        return staging

    @classmethod
    def find(cls, runs_dir: str | Path, session_id: str, visitor: Visitor = EVERYONE) -> Staging | None:
        """The session's staging folder if it exists and `visitor` owns it (a browser may remember one that was
        cleaned up; a stranger may name one that is not theirs)."""
        folder = Path(runs_dir) / STAGING_DIR / (session_id or "")
        if not (_SESSION_ID.fullmatch(session_id or "") and folder.is_dir() and visitor.owns_folder(folder)):
            return None
        return cls(folder, visitor=visitor)

    @property
    def session_id(self) -> str:
        return self.folder.name

    # ---- the demo's pictures, kept apart from the visitor's own --------------------------------
    @property
    def is_demo(self) -> bool:
        return (self.folder / DEMO_MARK).is_file()

    def mark_demo(self, own_session: str) -> None:
        """Make this the folder of the demo's pictures, which sets aside the visitor's own (`own_session`)."""
        write_text_atomic(self.folder / DEMO_MARK, own_session + "\n")

    @property
    def own_session(self) -> str:
        """The visitor's own folder the demo's pictures set aside ("" for none, or when this is the visitor's own)."""
        try:
            return (self.folder / DEMO_MARK).read_text("utf-8").strip()
        except FileNotFoundError:
            return ""

    def delete(self) -> None:
        """The whole folder gone (the demo's, which Try the demo draws again)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- adding files -------------------------------------------------------------------------
    def add_files(self, paths: Iterable[str | Path], before: bool = False) -> list[str]:
        """Add dropped files: images, .txt captions (matched to images by name) and .zip archives; with `before`, an
        edit's "before" pictures (a zip's too), each replacing the one of its name.

        Returns notes about files that were not added, in plain words.
        """
        room = self._room()
        notes: list[str] = []
        images, captions = [], {}
        for path in map(Path, paths):
            suffix = path.suffix.lower()
            if data.is_ignored(path.name):
                continue
            if suffix == ".zip":
                notes += self._add_zip(path, room, before)
            elif suffix in data.ALL_IMAGE_SUFFIXES:
                images.append(path)
            elif suffix == ".txt" and before:
                notes.append(f"{path.name}: a caption goes with its after picture; drop it with the pictures above")
            elif suffix == ".txt":
                captions[path.stem] = path
            else:
                notes.append(f"{path.name}: not an image, a .txt caption or a .zip, so it was left out")
        place = self._before_places() if before else None
        for image in images:
            if place is not None:
                notes += self._add_before(image, place(image.name), room)
                continue
            caption_file = captions.pop(image.stem, None)
            caption = data.read_caption_file(caption_file) if caption_file else None
            notes += self._add_image(image, image.name, caption, room)
        return notes + self._add_captions(captions) + room.notes()

    def _add_captions(self, captions: dict[str, Path]) -> list[str]:
        """Captions dropped without their pictures, each to the staged picture of its name: written together, with
        one look at the folder and one at the quota however many there are (all of them, or none past the quota)."""
        staged: dict[str, str] = {}
        for path in data.picture_files(self.folder):
            staged.setdefault(path.stem, path.relative_to(self.folder).as_posix())
        notes, matched = [], {}
        for stem, caption_file in captions.items():
            if stem not in staged:
                notes.append(f"{caption_file.name}: no image named {stem} to go with it; drop it with its image")
            elif len(caption := " ".join(data.read_caption_file(caption_file).split())) > MAX_CAPTION_CHARS:
                notes.append(f"{caption_file.name}: the caption of {staged[stem]}: {_too_long(caption)}")
            else:
                matched[staged[stem]] = caption
        try:
            if matched:
                self.set_captions(matched)
        except DataError as error:
            notes.append(f"{', '.join(path.name for path in captions.values())}: {error}")
        return notes

    def import_folder(self, folder: str | Path) -> list[str]:
        """Copy a folder's images and captions (same-name .txt or metadata.jsonl/.csv), subfolders too."""
        room = self._room()
        return self._import_folder(Path(folder), room) + room.notes()

    def _import_folder(self, folder: Path, room: _Room, before: bool = False) -> list[str]:
        folder = folder.expanduser()
        if not folder.is_dir():
            raise DataError(f"the folder {folder} does not exist; check the path")
        if halves := pair_halves(folder):
            return self._import_folder(halves[1], room) + self._import_folder(halves[0], room, before=True)
        metadata = data.metadata_captions(folder) or {}
        pictures, notes = data.picture_files(folder), []
        place = self._before_places() if before else None
        for path in pictures:
            relpath = path.relative_to(folder).as_posix()
            if place is not None:
                notes += self._add_before(path, place(relpath), room)
                continue
            caption_file = path.with_suffix(".txt")
            caption = metadata.get(relpath) or (
                data.read_caption_file(caption_file) if caption_file.is_file() else None
            )
            notes += self._add_image(path, relpath, caption, room)
        return (
            notes if pictures else [f"no images found in {folder.name} (looked for {', '.join(data.IMAGE_SUFFIXES)})"]
        )

    def _add_zip(self, path: Path, room: _Room, before: bool = False) -> list[str]:
        if too_big := room.file_too_big(path):
            return [too_big]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                _extract_zip(path, Path(tmp), room)
            except (zipfile.BadZipFile, OSError) as error:
                return [f"{path.name}: not a readable .zip file ({error})"]
            except DataError as error:
                return [f"{path.name}: {error}"]
            return self._import_folder(Path(tmp), room, before)

    def _add_image(self, source: Path, relpath: str, caption: str | None, room: _Room) -> list[str]:
        """Copy an image in (a byte-identical one already there is kept, a different one with the same
        name gets a new name), with its caption when it has one; a note instead for a kind of picture training
        can't read. Those are never kept: an SVG can hold a script, which nothing here may ever hand a page. A
        picture over the server's limits is left out too (`room` counts what is left)."""
        if refused := _refusal(source, relpath, room):
            return refused
        if caption is not None and len(caption) > MAX_CAPTION_CHARS:
            return [f"{PurePosixPath(relpath).name}: {_too_long(caption)}, so it was left out"]
        target = self.folder / relpath
        number = 1
        while target.exists() and not _same_bytes(target, source):
            number += 1
            target = target.with_name(f"{PurePosixPath(relpath).stem}-{number}{target.suffix}")
        if not target.exists():
            size = source.stat().st_size + (len((caption + "\n").encode()) if caption is not None else 0)
            if not room.take(size):
                return []  # counted in the one note room.notes() gives at the end
            _copy_in(source, target)
        if caption is not None:
            write_text_atomic(target.with_suffix(".txt"), caption + "\n")
        return []

    def _add_before(self, source: Path, relpath: str, room: _Room) -> list[str]:
        """Copy a "before" picture in under its name, as `_add_image` does a picture; it replaces the before picture
        of that name in any format (its partner is found by name, so a second one could never pair)."""
        if refused := _refusal(source, relpath, room):
            return refused
        target = self.before_folder / relpath
        if target.exists() and _same_bytes(target, source):
            return []
        if not room.take(source.stat().st_size):
            return []
        self._remove_befores(relpath)
        _copy_in(source, target)
        return []

    def _room(self) -> _Room:
        """What this visitor's staging can still take, from one walk of the folder (none without a quota)."""
        limits = self.limits or Limits()
        room = _Room(limits)
        if limits.max_staging_bytes is not None or limits.max_staging_files is not None:
            for folder in self._visitors_folders():
                used, pictures = _staged_size(folder)
                room.used_bytes, room.pictures = room.used_bytes + used, room.pictures + pictures
        return room

    def _visitors_folders(self) -> list[Path]:
        """This folder and the visitor's other staging folders: a quota per folder would let a visitor who opens a
        new one (another tab, Try the demo) stage as much again."""
        if self.folder.parent.name != STAGING_DIR:
            return [self.folder]
        others = [path for path in self.folder.parent.iterdir() if path.is_dir() and path != self.folder]
        return [self.folder, *(path for path in others if self.visitor.owns_folder(path))]

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

    @property
    def before_folder(self) -> Path:
        return self.folder / BEFORE_DIR

    def _before_places(self):
        """Where each before picture dropped now goes, beside its after picture (`staging_pairs.before_places`)."""
        return before_places([path.relative_to(self.folder).as_posix() for path in data.picture_files(self.folder)])

    def before_pictures(self) -> list[str]:
        """The "before" pictures dropped so far, as paths under `before_folder`."""
        if not self.before_folder.is_dir():
            return []
        return [path.relative_to(self.before_folder).as_posix() for path in data.picture_files(self.before_folder)]

    def before_thumbnails(self, relpaths: list[str]) -> dict[str, Path | None]:
        """Thumbnails of the before pictures of the pictures `relpaths`, by picture (None: it can't be read); a
        picture without a before picture is not in it."""
        befores = {pair_key(name): name for name in self.before_pictures()}
        named = {relpath: befores[pair_key(relpath)] for relpath in relpaths if pair_key(relpath) in befores}
        return {
            relpath: self._thumbnail(self.before_folder / name, f"{BEFORE_DIR}/{name}")[0]
            for relpath, name in named.items()
        }

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

    def check(self, resolution: int, default_caption: str = "", before: str | Path = "") -> DatasetReport:
        """Count, sizes, missing captions, unusable files, duplicates and too-small images; with before pictures
        (here, or in the folder `before`), the edit pairs training will make of them."""
        scan = data.scan_folder(self.folder, default_caption)
        uncaptioned = scan.uncaptioned(default_caption)
        report = DatasetReport(
            resolution=resolution,
            usable=scan.examples,
            uncaptioned=[skipped.name for skipped in uncaptioned],
            unusable=[skipped for skipped in scan.skipped if skipped not in uncaptioned],
            duplicates=scan.duplicates(),
        )
        if before or self.before_pictures():
            add_pairs(report, scan, run_dataset.pair_with_controls(scan, before or self.before_folder))
        report.too_small = [e for e in report.usable if min(e.size) < resolution]
        return report

    # ---- editing ------------------------------------------------------------------------------
    def caption_of(self, relpath: str) -> str:
        """One picture's caption ("" for none)."""
        caption_file = self._image(relpath).with_suffix(".txt")
        return data.read_caption_file(caption_file) if caption_file.is_file() else ""

    def set_caption(self, relpath: str, caption: str) -> None:
        self.set_captions({relpath: caption})

    def set_captions(self, captions: dict[str, str]) -> None:
        """Write pictures' captions, all or none: one too long, or all of them past what the visitor may still
        stage (captions count in the quota as pictures do), is refused before any is written."""
        files, texts = {}, {}
        for relpath, caption in captions.items():
            files[relpath], texts[relpath] = self._image(relpath).with_suffix(".txt"), " ".join(caption.split())
            if len(texts[relpath]) > MAX_CAPTION_CHARS:
                raise DataError(f"the caption of {relpath}: {_too_long(texts[relpath])}")
        grows = sum(len((text + "\n").encode()) - _size(files[relpath]) for relpath, text in texts.items())
        left = self._room().bytes_left
        if left is not None and grows > left:
            raise DataError(
                f"these captions would take {format_size(grows)} more, but only {format_size(left)} more fits in "
                f"the {format_size(self.limits.max_staging_bytes)} this server keeps per visitor; nothing was changed"
            )
        for relpath, text in texts.items():
            write_text_atomic(files[relpath], text + "\n")

    def remove(self, relpath: str) -> None:
        """Remove a picture, its caption, and its before picture (a pair goes whole)."""
        path = self._image(relpath)
        path.unlink()
        path.with_suffix(".txt").unlink(missing_ok=True)
        (self.folder / THUMBNAILS / f"{relpath}.png").unlink(missing_ok=True)
        self._remove_befores(relpath)

    def remove_before(self, relpath: str) -> None:
        """Remove a before picture (`relpath` under `before_folder`)."""
        path = (self.before_folder / relpath).resolve()
        if self.before_folder.resolve() not in path.parents or not path.is_file():
            raise DataError(f"the before picture {relpath} is not in this dataset (was it removed in another tab?)")
        path.unlink()

    def _remove_befores(self, relpath: str) -> None:
        """The before pictures named as `relpath` (in any picture format, any case), gone."""
        wanted = PurePosixPath(relpath)
        folder = self.before_folder.joinpath(*wanted.parent.parts)
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and path.stem.lower() == wanted.stem.lower():
                    path.unlink()

    def clear(self) -> None:
        """Remove every picture and caption; the folder stays its owner's (and the demo's, if it is)."""
        for path in self.folder.iterdir():
            if path.name not in (OWNER_FILE, DEMO_MARK):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def add_trigger_word(self, word: str | None) -> int:
        """Put `word` in front of every caption that lacks it; returns how many changed."""
        word = (word or "").strip()
        if not word:
            raise DataError("type the trigger word first (a rare made-up word such as sks or ohwx)")
        return self._edit_captions(lambda caption: data.full_caption(caption, word))

    def replace_in_captions(self, find: str | None, replace: str | None) -> int:
        if not find:
            raise DataError("type the text to find first")
        return self._edit_captions(lambda caption: caption.replace(find, replace or ""))

    def fill_empty_captions(self, caption: str | None) -> int:
        if not (caption or "").strip():
            raise DataError("type the caption to use for images that have none")
        return self._edit_captions(lambda current: current or caption)

    def _edit_captions(self, edit) -> int:
        new = {item.relpath: (item.caption, " ".join(edit(item.caption).split())) for item in self.items()}
        changed = {relpath: caption for relpath, (old, caption) in new.items() if caption != old}
        self.set_captions(changed)
        return len(changed)

    def _image(self, relpath: str) -> Path:
        path = (self.folder / relpath).resolve()
        if self.folder.resolve() not in path.parents or not path.is_file():
            raise DataError(f"{relpath} is not in this dataset (was it removed in another tab?)")
        return path


@dataclass
class _Room:
    """How much more one visitor may stage during one add call: the folder is measured once, then each picture
    is counted as it goes in, so a drop of a thousand pictures walks the folder once."""

    limits: Limits
    used_bytes: int = 0  # pictures and captions
    pictures: int = 0
    left_out: int = 0  # pictures refused for the quota, told in one note

    def file_too_big(self, path: Path, name: str = "") -> str | None:
        """The note for one file (a picture or a zip) over the size a file may have here, or None."""
        limit, size = self.limits.max_file_bytes, path.stat().st_size
        if limit is None or size <= limit:
            return None
        return (
            f"{name or path.name}: {format_size(size)}, over the {format_size(limit)} a file may have here, "
            "so it was left out"
        )

    @property
    def bytes_left(self) -> int | None:
        limit = self.limits.max_staging_bytes
        return None if limit is None else max(0, limit - self.used_bytes)

    def take(self, size: int) -> bool:
        """Count a picture of `size` bytes (with its caption) in if it fits; else count it as left out."""
        full = self.limits.max_staging_files is not None and self.pictures >= self.limits.max_staging_files
        if full or (self.bytes_left is not None and size > self.bytes_left):
            self.left_out += 1
            return False
        self.used_bytes += size
        self.pictures += 1
        return True

    def notes(self) -> list[str]:
        if not self.left_out:
            return []
        kept = [f"{self.limits.max_staging_files} pictures"] if self.limits.max_staging_files is not None else []
        if self.limits.max_staging_bytes is not None:
            kept.append(format_size(self.limits.max_staging_bytes))
        were = "1 picture was" if self.left_out == 1 else f"{self.left_out} pictures were"
        return [f"{were} left out: this server keeps at most {' / '.join(kept)} per visitor; remove some first"]

    def zip_too_big(self, unpacked: int) -> str | None:
        """Why a zip that unpacks to `unpacked` bytes can't come in, or None: refused before anything is
        extracted, as nothing of it could be kept."""
        if self.bytes_left is not None and unpacked > self.bytes_left and self.bytes_left < MAX_ZIP_BYTES:
            return (
                f"it unpacks to {format_size(unpacked)}, but only {format_size(self.bytes_left)} more fits in the "
                f"{format_size(self.limits.max_staging_bytes)} this server keeps per visitor, so nothing in it "
                "was added; remove some pictures first, or send a smaller zip"
            )
        if unpacked > MAX_ZIP_BYTES:  # a zip bomb stops here, quota or not
            return f"it unpacks to more than {MAX_ZIP_BYTES >> 30} GB"
        return None


def _refusal(source: Path, relpath: str, room: _Room) -> list[str]:
    """Why a picture can't come in (a kind training can't read, over the size a file may have here), or []."""
    if problem := data.format_problem(relpath):
        return [f"{PurePosixPath(relpath).name}: {problem}, so it was left out"]
    if too_big := room.file_too_big(source, PurePosixPath(relpath).name):
        return [too_big]
    return []


def _copy_in(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _staged_size(folder: Path) -> tuple[int, int]:
    """Bytes and pictures staged in `folder`: every file but the thumbnails and the owner's mark (the app's)."""
    used, pictures, pending = 0, 0, [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if current == folder and entry.name in (THUMBNAILS, OWNER_FILE, DEMO_MARK):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_size
                    pictures += os.path.splitext(entry.name)[1].lower() in data.ALL_IMAGE_SUFFIXES
    return used, pictures


def _too_long(caption: str) -> str:
    return f"{len(caption):,} characters, and a caption may have at most {MAX_CAPTION_CHARS:,} here"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _extract_zip(path: Path, target: Path, room: _Room) -> None:
    """Unpack a zip, passing over paths that climb out of `target`, and refusing archives that unpack too big
    (for the server, or for what `room` can still take), before anything is written."""
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > MAX_ZIP_FILES:
            raise DataError(f"it holds {len(members)} files; at most {MAX_ZIP_FILES} are accepted")
        wanted = []
        for info in members:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if not (name.is_absolute() or ".." in name.parts or any(map(data.is_ignored, name.parts))):
                wanted.append((info, name))
        # The sizes the zip declares bound what is read: zipfile stops at a member's file_size.
        if problem := room.zip_too_big(sum(info.file_size for info, _ in wanted)):
            raise DataError(problem)
        for info, name in wanted:
            destination = target.joinpath(*name.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, destination.open("wb") as sink:
                shutil.copyfileobj(source, sink)
