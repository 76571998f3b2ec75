"""The edit pairs of a staged dataset (staging.py): a zip or folder holding before/ and after/ split, where a dropped
"before" picture goes so that it finds its "after" picture, and what the checks say of the pairs. Pairs are matched by
`run_dataset.pair_with_controls`, as training matches them: the same path and name, in any picture format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from lora_gui import data
from lora_gui.run_dataset import pair_key

if TYPE_CHECKING:
    from lora_gui.staging import DatasetReport

# A zip or folder holding both halves of edit pairs, in folders named so (any case), is split by itself.
BEFORE_NAMES, AFTER_NAMES = ("before",), ("after",)


def pair_halves(folder: Path) -> tuple[Path, Path] | None:
    """The before and after folders of edit pairs in `folder` (or in the one folder it holds, as a zip of a folder
    has), or None."""
    subfolders = [path for path in folder.iterdir() if path.is_dir() and not data.is_ignored(path.name)]
    named = {path.name.lower(): path for path in subfolders}
    before = next((named[name] for name in BEFORE_NAMES if name in named), None)
    after = next((named[name] for name in AFTER_NAMES if name in named), None)
    if before is not None and after is not None:
        return before, after
    files = [path for path in folder.iterdir() if path.is_file() and not data.is_ignored(path.name)]
    return pair_halves(subfolders[0]) if len(subfolders) == 1 and not files else None


def before_places(pictures: list[str]) -> Callable[[str], str]:
    """Where each before picture goes, given the after pictures staged (`pictures`): at its own path where an after
    picture has that name; else beside the one after picture of its name elsewhere (the two halves zipped from
    folders named apart); else as it is, which the checks then name as a picture without a partner."""
    keys = {pair_key(picture) for picture in pictures}
    by_name: dict[str, list[str]] = {}
    for picture in pictures:
        by_name.setdefault(PurePosixPath(picture).stem.lower(), []).append(picture)

    def place(relpath: str) -> str:
        named = by_name.get(PurePosixPath(relpath).stem.lower(), [])
        if pair_key(relpath) in keys or len(named) != 1:
            return relpath
        return PurePosixPath(named[0]).with_suffix(PurePosixPath(relpath).suffix).as_posix()

    return place


def add_pairs(report: DatasetReport, scan: data.Scan, paired: data.Scan) -> None:
    """The checks of edit pairs into `report`: the pairs are what trains, each after picture without a before
    picture is named, and a before picture whose after picture is left out for another reason (no caption) is
    not called a picture without a partner."""
    report.paired, report.usable, report.reshaped = True, paired.examples, paired.reshaped_pairs
    for skipped in paired.skipped[len(scan.skipped) :]:  # what pairing left out
        if skipped.reason.startswith("no before picture"):
            report.no_before.append(skipped.name)
        else:
            report.unusable.append(skipped)
    left_out = {pair_key(skipped.name) for skipped in scan.skipped}
    report.no_after = [name for name in paired.unpaired_controls if pair_key(name) not in left_out]
