"""Atomic writes: a temporary name beside the target, then a rename, so a crash never leaves a half-written
file (or folder) where a good one stood."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target` in one rename.

    The writer creates the temporary file itself, so it gets the usual permissions (mkstemp's
    would be private to this user).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def being_written(target: Path) -> Path:
    """The temporary folder beside `target` that `atomic_folder` writes it in, when the writer owns `target`."""
    return target.with_name(f".{target.name}.tmp")


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty folder beside `target` to write it in; on success it becomes `target` in one rename, on
    failure it is removed, so `target` is whole or not there.

    With `replace`, the writer owns `target`: a folder there is replaced, and the temporary one has a fixed name
    (`being_written`), so a crash's leftover is cleared and the processes of a launched run can all write into it.
    Without, writers may race to make the same folder (a model written on first use): each writes its own, the
    first rename wins, and a later one raises OSError and its copy is dropped."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        tmp = being_written(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
