"""A run's own dataset: its pictures from wherever they are (a folder; a folder and the "before" pictures of its edit
pairs; a Hugging Face dataset) copied into the run once, in kohya's layout, which training then reads alone.

Edit pairs: each training picture is the "after" half of a pair, its "before" picture in another folder under the
same name (any picture format) or in a Hub dataset's column beside it; the caption says the edit. A picture without
its partner is left out, with its reason; "before" pictures without a partner and pairs whose two pictures differ in
shape are listed for the Dataset tab's checks (such a pair trains with its "before" picture stretched to the "after"
picture's shape, so their contents stay aligned).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from PIL import Image

from lora_gui.atomic import atomic_folder
from lora_gui.data import (
    CAPTION_COLUMNS,
    IMAGE_SUFFIXES,
    Example,
    Scan,
    Skipped,
    UnusableImage,
    open_image,
    picture_files,
    read_caption_file,
    read_header,
    scan_folder,
)
from lora_gui.errors import DataError

if TYPE_CHECKING:
    from lora_gui.config import TrainConfig
    from lora_gui.runs import RunFolder

log = logging.getLogger(__name__)

# A Hub dataset's column of an edit's "before" pictures, as the edit datasets and trainers name it.
CONTROL_COLUMNS = ("control_image", "control", "conditioning_image", "input_image", "source_image", "before")
# How far a pair's shapes (width / height) may differ before the checks say so: the "before" picture is stretched to
# the "after" picture's shape, which a photo resized by a few pixels doesn't show.
PAIR_SHAPE_TOLERANCE = 0.02


# ---- edit pairs ------------------------------------------------------------------------------------


def pair_with_controls(scan: Scan, control_folder: str | Path) -> Scan:
    """The scan's pictures as the "after" halves of edit pairs, each with its "before" picture from `control_folder`:
    the one at the same place under the same name, in any picture format. A picture without one is left out, with
    its reason; "before" pictures without a partner, and pairs that differ in shape, are listed."""
    folder = Path(control_folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"the folder of before pictures {folder} does not exist; check the path")
    controls = {pair_key(path.relative_to(folder).as_posix()): path for path in picture_files(folder)}
    paired = Scan(skipped=list(scan.skipped))
    for example in scan.examples:
        key = pair_key(example.relpath or example.path.name)
        control = controls.pop(key, None)
        if control is None:
            paired.skipped.append(
                Skipped(example.caption_source, f"no before picture (none named {key}.* among the before pictures)")
            )
            continue
        header = read_header(control)
        if header.problem:
            paired.skipped.append(
                Skipped(example.caption_source, f"its before picture can't be used: {header.problem}")
            )
            continue
        if _differ_in_shape(header.size, example.size):
            paired.reshaped_pairs.append(_reshaped(example.caption_source, header.size, example.size))
        paired.examples.append(replace(example, control=control))
    paired.unpaired_controls = sorted(path.relative_to(folder).as_posix() for path in controls.values())
    return paired


def pair_key(relpath: str) -> str:
    """A picture's name as pairs are matched: its path without its suffix, in lower case."""
    return PurePosixPath(relpath).with_suffix("").as_posix().lower()


def _differ_in_shape(before: tuple[int, int], after: tuple[int, int]) -> bool:
    return abs(math.log((before[0] / before[1]) / (after[0] / after[1]))) > PAIR_SHAPE_TOLERANCE


def _reshaped(name: str, before: tuple[int, int], after: tuple[int, int]) -> str:
    return f"{name}: before {before[0]}x{before[1]}, after {after[0]}x{after[1]}"


# ---- Hugging Face datasets ---------------------------------------------------------------------
def is_hf_dataset_folder(folder: Path) -> bool:
    """A local copy of a Hub dataset repo (parquet/arrow files) rather than a folder of images."""
    if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
        return True
    has_tables = any(folder.rglob("*.parquet")) or any(folder.rglob("*.arrow"))
    has_images = any(path.suffix.lower() in IMAGE_SUFFIXES for path in picture_files(folder))
    return has_tables and not has_images


def scan_hf_dataset(
    name: str, image_column: str = "", caption_column: str = "", default_caption: str = "", control_column: str = ""
) -> Scan:
    """Load a Hugging Face dataset and turn its rows into images in memory, skipping bad rows; with a column of
    "before" pictures (`control_column`, or one of `CONTROL_COLUMNS`), each row is an edit pair."""
    import datasets

    try:
        table = datasets.load_dataset(name, split="train")
    except FileNotFoundError:
        raise DataError(
            f"no dataset named {name!r} was found, on this computer or on the Hugging Face Hub; check the name"
        ) from None
    except (ConnectionError, OSError) as error:
        raise DataError(
            f"could not load the dataset {name!r}: {str(error).splitlines()[0]}. If it is on the Hub, check your "
            "internet connection; gated or private datasets need you to log in (`hf auth login`)"
        ) from None
    except ValueError as error:
        raise DataError(f"could not load the dataset {name!r}: {str(error).splitlines()[0]}") from None
    image_column = image_column or _guess_image_column(table)
    caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in table.column_names), "")
    control_column = control_column or next((c for c in CONTROL_COLUMNS if c in table.column_names), "")
    for column, what in ((image_column, "image"), (caption_column, "caption"), (control_column, "before-picture")):
        if column and column not in table.column_names:
            raise DataError(
                f"the dataset has no {what} column named {column!r}; its columns are {', '.join(table.column_names)}"
            )
    if not image_column:
        raise DataError(f"the dataset has no image column; its columns are {', '.join(table.column_names)}")
    for column in (image_column, control_column) if control_column else (image_column,):
        table = table.cast_column(column, datasets.Image(decode=False))
    scan = Scan()
    for index, row in enumerate(table):
        label = f"row {index}"
        try:
            image = _cell_image(row[image_column], "the image cell is empty")
            control = _cell_image(row[control_column], "its before picture's cell is empty") if control_column else None
        except (UnusableImage, OSError) as problem:
            scan.skipped.append(Skipped(label, str(problem)))
            continue
        caption = row.get(caption_column) if caption_column else ""
        caption = " ".join(caption.split()) if isinstance(caption, str) else ""
        caption = caption or default_caption.strip()
        if not caption:
            scan.skipped.append(Skipped(label, "no caption (empty caption column, and no default caption is set)"))
            continue
        name = f"{index:06d}.png"
        example = Example(
            path=Path(name), caption=caption, size=image.size, relpath=name, image=image, control_image=control
        )
        scan.examples.append(example)
        if control is not None and _differ_in_shape(control.size, image.size):
            scan.reshaped_pairs.append(_reshaped(label, control.size, image.size))
    return scan


def _cell_image(cell: dict | None, empty: str) -> Image.Image:
    """A Hub dataset's picture cell (undecoded: its bytes or its path), decoded; UnusableImage saying why not."""
    cell = cell or {}
    if cell.get("bytes"):
        return open_image(cell["bytes"])
    if cell.get("path"):
        return open_image(Path(cell["path"]))
    raise UnusableImage(empty)


def _guess_image_column(table) -> str:
    import datasets

    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            return name
    return "image" if "image" in table.column_names else ""


# ---- from any source into the run ---------------------------------------------------------------
def scan_source(
    source: str,
    default_caption: str = "",
    image_column: str = "",
    caption_column: str = "",
    control_data: str = "",
    control_column: str = "",
) -> Scan:
    """Scan a folder or a Hugging Face dataset (a Hub name, or a local copy of one); with `control_data`, a folder of
    pictures is paired with the "before" pictures there (`pair_with_controls`)."""
    source = source.strip()
    if not source:
        raise DataError("no training images chosen: give a folder of images or a Hugging Face dataset name")
    folder = Path(source).expanduser()
    if folder.is_dir() and not is_hf_dataset_folder(folder):
        scan = scan_folder(folder, default_caption)
        if control_data.strip():
            scan = pair_with_controls(scan, control_data.strip())
    elif folder.is_dir() or (not folder.exists() and "/" in source and not source.startswith((".", "/", "~"))):
        if control_data.strip():
            raise DataError(
                "a Hugging Face dataset holds its before pictures in a column (control_column), not in a folder: "
                "leave control_data empty"
            )
        scan = scan_hf_dataset(source, image_column, caption_column, default_caption, control_column)
    elif folder.exists():
        raise DataError(f"{folder} is a file, not a folder; give the folder that holds the images")
    else:
        raise DataError(f"the image folder {folder} does not exist; check the path")
    scan.require_some(source)
    return scan


def copy_into_run(scan: Scan, dataset_dir: Path, link: bool = False, control_dir: Path | None = None) -> Scan:
    """Write the usable images and their captions into the run's dataset/ folder (kohya layout), and an edit's
    "before" pictures into `control_dir` under the same names (each keeping its own format).

    Each folder appears whole or not at all. With `link`, each image is a hard link to its source where the
    disk allows (a copy otherwise): for sources whose files are only ever replaced, never rewritten in place,
    as the app's staging folder, so the run keeps the pictures as they were.
    """
    copied = Scan(skipped=list(scan.skipped), reshaped_pairs=list(scan.reshaped_pairs))
    with atomic_folder(dataset_dir) as building:
        for example in scan.examples:
            relpath = example.relpath or example.path.name
            target = building / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_picture(example.image, example.path, target, link)
            target.with_suffix(".txt").write_text(example.caption + "\n", encoding="utf-8")
            copied.examples.append(
                Example(path=dataset_dir / relpath, caption=example.caption, size=example.size, relpath=relpath)
            )
    if control_dir is not None and scan.paired:
        with atomic_folder(control_dir) as building:
            for example, copy in zip(scan.examples, copied.examples, strict=True):
                suffix = example.control.suffix if example.control is not None else ".png"
                target = (building / copy.relpath).with_suffix(suffix)
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_picture(example.control_image, example.control, target, link)
                copy.control = (control_dir / copy.relpath).with_suffix(suffix)
    return copied


def _write_picture(image: Image.Image | None, source: Path | None, target: Path, link: bool) -> None:
    """A picture into a run: a decoded one saved, a file linked or copied."""
    if image is not None:
        image.save(target)
    else:
        _link_or_copy(source, target, link)


def _link_or_copy(source: Path, target: Path, link: bool) -> None:
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another disk, or a file system without hard links
            pass
    shutil.copy2(source, target)


def prepare_run_dataset(config: TrainConfig, run: RunFolder) -> list[str]:
    """Write the run's dataset/ from `config.data` and return what was left out, each with its reason.

    The app writes dataset/ itself when Start is pressed, and points `config.data` at it: that folder is
    used as it is, never copied onto itself, and what was left out then is read from the run's report.
    """
    if Path(config.data).expanduser().resolve() == run.dataset:
        skipped = run.read_skipped()
    else:
        scan = scan_source(
            config.data,
            config.default_caption,
            config.image_column,
            config.caption_column,
            config.control_data,
            config.control_column,
        )
        copy_into_run(scan, run.dataset, control_dir=run.control)
        skipped = [str(each) for each in scan.skipped]
    for each in skipped:
        log.warning("Skipped %s", each)
    return skipped


def run_prompt(config: TrainConfig, run: RunFolder) -> str:
    """A prompt a run's LoRA knows: its first preview prompt, else its first training caption."""
    prompts = [prompt for prompt in config.sample_prompts if prompt.strip()]
    if prompts:
        return prompts[0]
    captions = sorted(run.dataset.rglob("*.txt")) if run.dataset.is_dir() else []
    return read_caption_file(captions[0]) if captions else ""


# ---- validation pictures -----------------------------------------------------------------------
def prepare_validation_folder(config: TrainConfig, run: RunFolder) -> list[str]:
    """Copy `config.validation_data` into the run's own validation/ at a new run's start, so a resume measures
    the same pictures wherever that folder went; what was left out, each with its reason."""
    scan = scan_folder(config.validation_data, config.default_caption)
    scan.require_some(config.validation_data)
    copy_into_run(scan, run.validation_pictures)
    return [f"validation picture {each}" for each in scan.skipped]
