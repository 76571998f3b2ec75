"""Training images: find them, check them, read their captions.

A folder of images with same-name .txt captions (subfolders too), or a folder with metadata.jsonl /
metadata.csv (`file_name` + `text`, as `datasets`' imagefolder reads it). Whatever the source (a Hugging
Face dataset too), the run gets its own copy (run_dataset.py), which training reads alone.

Checks read a picture's header only (its size, the limits, whether the file is cut off), and
remember the answer per file, so the Dataset tab's checks stay instant however large the pictures
are. Pixels are decoded once, when training caches latents; a picture whose damage only shows then
is left out there, with its reason.

A file that can't be used is skipped with a reason a person understands; a user's file never
produces a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Generic, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from lora_gui.errors import DataError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Image formats people drop in that we can't read; named so they are reported, not silently ignored.
OTHER_IMAGE_SUFFIXES = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".raw", ".cr2")
ALL_IMAGE_SUFFIXES = IMAGE_SUFFIXES + OTHER_IMAGE_SUFFIXES
# Never the user's pictures, wherever they sit (compared in lower case), besides every hidden name (.DS_Store,
# macOS's ._name copies): the folder macOS adds to zips, and what Windows leaves in folders.
IGNORED_NAMES = ("__macosx", "thumbs.db", "desktop.ini")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MIN_SIDE = 32
MAX_PIXELS = 64_000_000
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "description", "sentence")


@dataclass
class Example:
    """One usable training image and its caption."""

    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) after EXIF rotation
    relpath: str = ""  # where it sits in its folder
    image: Image.Image | None = field(default=None, repr=False)  # decoded rows of a Hub dataset, until copied
    # An edit's "before" picture (this one is the "after"): its file, or a Hub dataset row's decoded picture.
    control: Path | None = None
    control_image: Image.Image | None = field(default=None, repr=False)

    @property
    def caption_source(self) -> str:
        return self.relpath or self.path.name


@dataclass
class Skipped:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class Scan:
    """What a look at the training images found."""

    examples: list[Example] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # Edit pairs: the "before" pictures no training picture is named as, and the pairs whose two pictures differ in
    # shape (each as "name: before WxH, after WxH"), which train with the "before" picture stretched.
    unpaired_controls: list[str] = field(default_factory=list)
    reshaped_pairs: list[str] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        return any(example.control is not None or example.control_image is not None for example in self.examples)

    def duplicates(self) -> list[list[str]]:
        """Groups of byte-identical images. Only files of the same size can be, so only those are hashed."""
        sizes = [example.path.stat().st_size for example in self.examples]
        counts = Counter(sizes)
        by_hash: dict[str, list[str]] = {}
        for example, size in zip(self.examples, sizes, strict=True):
            if counts[size] > 1:
                by_hash.setdefault(_file_hash(example.path), []).append(example.caption_source)
        return [names for names in by_hash.values() if len(names) > 1]

    def smaller_than(self, resolution: int) -> list[Example]:
        return [e for e in self.examples if min(e.size) < resolution]

    def uncaptioned(self, default_caption: str) -> list[Skipped]:
        return [s for s in self.skipped if s.reason.startswith("no caption")] if not default_caption else []

    def require_some(self, source: str) -> None:
        if self.examples:
            return
        if not self.skipped:
            raise DataError(
                f"no images found in {source}: put .jpg, .png, .webp or .bmp files there (subfolders count too)"
            )
        reasons: dict[str, int] = {}
        for skipped in self.skipped:
            reasons[skipped.reason.split(" (")[0]] = reasons.get(skipped.reason.split(" (")[0], 0) + 1
        summary = "; ".join(f"{count} {reason}" for reason, count in reasons.items())
        hint = ""
        if any(reason.startswith("no caption") for reason in reasons):
            hint = " Add a .txt caption beside each image, or set a default caption."
        raise DataError(f"no usable images in {source}: every file was skipped ({summary}).{hint}")


# ---- which files are pictures -------------------------------------------------------------------
def is_ignored(name: str) -> bool:
    """Whether a file or folder name is one to pass over: hidden, or left by an operating system."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def picture_files(folder: Path) -> list[Path]:
    """Every file in `folder` and its subfolders that is named as a picture (readable or not), in path order.

    The one walk every folder of pictures goes through (a scan, a folder import, the staged listing), so
    they all pass over the same names. Symlinked folders are not entered, so a link loop can't trap it.
    """
    found, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if is_ignored(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in ALL_IMAGE_SUFFIXES:
                    found.append(Path(entry.path))
    return sorted(found)


# ---- reading one image -------------------------------------------------------------------------
class UnusableImage(Exception):
    """Raised with the plain reason an image can't be used."""


CUT_OFF = "truncated or damaged image (the file is cut off)"


@dataclass(frozen=True)
class Header:
    """What a picture file says about itself without its pixels being decoded."""

    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation
    problem: str = ""  # why it can't be used; "" when it can


Result = TypeVar("Result")


class PerFile(Generic[Result]):
    """A fact about each file, worked out once and remembered while the file stays as it was.

    The key is the path with the file's size, modification time and inode, so a file edited in place or
    replaced (the staging folder replaces files by renaming new ones over them) is looked at anew. Every
    entry can be worked out again from its file, so when there are too many the lot is forgotten.
    Handlers run on several threads: at worst two of them work out the same entry.
    """

    LIMIT = 100_000

    def __init__(self, work_out: Callable[[Path], Result]):
        self.work_out = work_out
        self._known: dict[tuple[str, int, int, int], Result] = {}

    def __call__(self, path: Path) -> Result:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        try:
            return self._known[key]
        except KeyError:
            pass
        if len(self._known) >= self.LIMIT:
            self._known.clear()
        result = self._known[key] = self.work_out(path)
        return result


@contextlib.contextmanager
def _opened(source: Path | bytes) -> Iterator[tuple[Image.Image, BinaryIO]]:
    """The image with its header read and its size checked, and the open file; any failure inside the block
    (a decoding one too) comes out as an UnusableImage with its plain reason."""
    if isinstance(source, Path) and source.stat().st_size == 0:
        raise UnusableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = source.open("rb") if isinstance(source, Path) else io.BytesIO(source)
            with handle, Image.open(handle) as image:
                _check_size(*image.size)
                yield image, handle
    except UnusableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnusableImage("too large (decompression bomb protection)") from None
    except UnidentifiedImageError:
        raise UnusableImage("not an image file, or a format that can't be read") from None
    except (OSError, SyntaxError, ValueError) as error:
        if "truncated" in str(error).lower():
            raise UnusableImage(CUT_OFF) from None
        raise UnusableImage(f"damaged image ({error})") from None


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise UnusableImage(f"too large ({width}x{height} px; at most {MAX_PIXELS // 1_000_000} megapixels)")
    if min(width, height) < MIN_SIDE:
        raise UnusableImage(f"too small ({width}x{height} px; needs at least {MIN_SIDE} px per side)")


def format_problem(name: str) -> str | None:
    """Why a picture with this file name can't be trained on, from its name alone; None when it can be."""
    suffix = os.path.splitext(name)[1].lower()
    return f"{suffix} images are not supported (convert it to PNG or JPG)" if suffix in OTHER_IMAGE_SUFFIXES else None


def _read_header(path: Path) -> Header:
    if problem := format_problem(path.name):
        return Header(problem=problem)
    try:
        with _opened(path) as (image, handle):
            if _cut_off(handle, image.format):
                raise UnusableImage(CUT_OFF)
            # Image.getexif as such reads the EXIF that came with the header; PNG's own version decodes the
            # pixels first, to look for an EXIF chunk after them, where writers don't put it.
            orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
            return Header(size=image.size[::-1] if orientation in (5, 6, 7, 8) else image.size)
    except UnusableImage as problem:
        return Header(problem=str(problem))


_headers = PerFile(_read_header)


def read_header(path: Path) -> Header:
    """What a picture file's header says, remembered per file: its upright size, or why it can't be used."""
    return _headers(path)


def _cut_off(handle: BinaryIO, image_format: str | None) -> bool:
    """Whether the file stops before its picture ends (a download or copy cut short), told from where the
    format's end marker is, without decoding. Only a sure answer counts: any other damage shows when decoding."""
    end = handle.seek(0, os.SEEK_END)
    if image_format in ("JPEG", "MPO"):
        handle.seek(end - 2)
        if handle.read(2) == b"\xff\xd9":
            return False
        # Something may follow the picture (a phone's motion photo carries its video there): then the end
        # marker must come after the start of the first scan.
        handle.seek(0)
        content = handle.read()
        first_scan = content.find(b"\xff\xda")
        return first_scan < 0 or content.find(b"\xff\xd9", first_scan) < 0
    if image_format == "PNG":
        handle.seek(end - 12)
        if handle.read(12) == b"\0\0\0\0IEND\xaeB`\x82":
            return False
        position = 8  # after the signature, chunk by chunk: length, type, data, checksum
        while position + 8 <= end:
            handle.seek(position)
            length, kind = struct.unpack(">I4s", handle.read(8))
            if kind == b"IEND":
                return False
            position += length + 12
        return True
    return False  # WebP: Pillow reads the whole file to open it, and refuses a cut one then


def open_image(source: Path | bytes, draft_side: int = 0) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB, upright, transparency on white.

    With `draft_side`, a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale that keeps that many pixels
    a side: a thumbnail costs a fraction of a full decoding.
    """
    with _opened(source) as (image, _):
        if draft_side:
            image.draft("RGB", (draft_side, draft_side))
        image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit images: PIL's convert("L") clips at 255, which turns them white; scale instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            log.debug("ICC conversion failed; using the plain CMYK formula")
    return image.convert("RGB")


# ---- captions ----------------------------------------------------------------------------------
def read_caption_file(path: Path) -> str:
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "utf-16", "cp1252"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        text = raw.decode("latin-1")
    return " ".join(text.split())


def full_caption(caption: str, trigger_word: str) -> str:
    """The caption as trained: the trigger word in front, unless the caption already has it."""
    trigger = trigger_word.strip()
    # A word of the caption, whatever punctuation follows it ("ohwx, a dog", "ohwx: make it pink").
    if not trigger or trigger.lower() in re.split(r"[\s,;:.!?()]+", caption.lower()):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def metadata_captions(folder: Path) -> dict[str, str] | None:
    """file_name -> caption from metadata.jsonl or metadata.csv, or None when there is neither."""
    jsonl, csv_path = folder / METADATA_FILES[0], folder / METADATA_FILES[1]
    rows: list[dict]
    if jsonl.is_file():
        rows = []
        for number, line in enumerate(jsonl.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"metadata.jsonl line {number} is not valid JSON; fix or delete that line") from None
    elif csv_path.is_file():
        with csv_path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        return None
    captions = {}
    for row in rows:
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError("each row of the metadata file needs a file_name column (and a text column for captions)")
        text = next((row[c] for c in CAPTION_COLUMNS if isinstance(row.get(c), str)), "")
        captions[str(Path(row["file_name"]).as_posix())] = " ".join(text.split())
    return captions


# ---- scanning a folder ------------------------------------------------------------------------
def scan_folder(folder: str | Path, default_caption: str = "") -> Scan:
    """Every usable image in a folder (subfolders included) with its caption, and what was skipped."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"the image folder {folder} does not exist; check the path")
    metadata = metadata_captions(folder)
    scan = Scan()
    for path in picture_files(folder):
        relpath = path.relative_to(folder).as_posix()
        header = read_header(path)
        if header.problem:
            scan.skipped.append(Skipped(relpath, header.problem))
            continue
        caption = _caption_for(path, relpath, metadata) or default_caption.strip()
        if not caption:
            where = "no line in the metadata file" if metadata is not None else f"no {path.stem}.txt beside it"
            scan.skipped.append(Skipped(relpath, f"no caption ({where}, and no default caption is set)"))
            continue
        scan.examples.append(Example(path=path, caption=caption, size=header.size, relpath=relpath))
    return scan


def _caption_for(path: Path, relpath: str, metadata: dict[str, str] | None) -> str:
    if metadata is not None and metadata.get(relpath):
        return metadata[relpath]
    caption_file = path.with_suffix(".txt")
    return read_caption_file(caption_file) if caption_file.is_file() else ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_file_hash = PerFile(_sha256)
