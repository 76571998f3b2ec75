"""Quotas and cleanup for a server strangers share: the limits read from the environment, the staging folder
refusing what is over them with a note a beginner understands, the checks before a run starts, and the deletion
of forgotten staging folders and old runs (never one a job is working on)."""

from __future__ import annotations

import os
import shutil
import zipfile
from collections import namedtuple
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_gui import limits as limits_module
from lora_gui import staging as staging_module
from lora_gui.demo import draw_shape
from lora_gui.errors import ConfigError, LoraGuiError
from lora_gui.limits import (
    DAY,
    Limits,
    check_free_disk,
    check_runs_waiting,
    expire_runs,
    format_size,
)
from lora_gui.owners import OWNER_FILE, Visitor
from lora_gui.runs import RunFolder
from lora_gui.staging import THUMBNAILS, Staging, expire_staging

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment with none of the limits' variables set, whatever the machine running the tests has."""
    for setting in limits_module._SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    return monkeypatch


def picture(path: Path, size: int = 10_000, seed: int = 1) -> Path:
    """A real PNG of exactly `size` bytes (trailing zeros after the image, which readers ignore)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape("circle", (220, 40, 40), (96, 96), seed=seed).save(path)
    with path.open("ab") as file:
        file.write(bytes(size - path.stat().st_size))
    return path


def pictures(folder: Path, count: int, first_seed: int = 1) -> list[Path]:
    return [picture(folder / f"p{seed}.png", seed=seed) for seed in range(first_seed, first_seed + count)]


def staged(staging: Staging) -> list[str]:
    return sorted(item.relpath for item in staging.items())


def shared_staging(tmp_path: Path, limits: Limits) -> Staging:
    """A visitor's staging folder on a shared server: its owner is recorded in it, and the app sets its limits."""
    staging = Staging.for_session(tmp_path / "runs", visitor=Visitor(owner="hf:someone"))
    assert (staging.folder / OWNER_FILE).is_file()
    staging.limits = limits
    return staging


# ---- the environment ---------------------------------------------------------------------------
def test_defaults_differ_on_a_space_and_on_ones_own_computer_except_the_free_disk_floor(environment):
    assert Limits.from_environment(on_space=True) == Limits(
        max_file_bytes=500_000_000,
        max_staging_bytes=2_000_000_000,
        max_staging_files=1000,
        max_runs_waiting=1,
        max_runs_queued=10,
        max_upload_folder_bytes=5_000_000_000,
        min_free_bytes=2_000_000_000,
        staging_days=7,
        run_days=None,
    )
    assert Limits.from_environment(on_space=False) == Limits(min_free_bytes=2_000_000_000)


def test_variables_set_limits_in_their_units_and_0_none_or_off_turn_one_off(environment):
    environment.setenv("LORA_GUI_MAX_FILE_MB", "1.5")
    environment.setenv("LORA_GUI_MAX_STAGING_MB", "0")
    environment.setenv("LORA_GUI_MAX_FILES", " none ")
    environment.setenv("LORA_GUI_MAX_RUNS_PER_VISITOR", "3")
    environment.setenv("LORA_GUI_MAX_QUEUED_RUNS", "off")
    environment.setenv("LORA_GUI_MAX_UPLOADS_MB", "0")
    environment.setenv("LORA_GUI_MIN_FREE_GB", "OFF")
    environment.setenv("LORA_GUI_STAGING_DAYS", "2")
    environment.setenv("LORA_GUI_RUN_DAYS", "30")
    assert Limits.from_environment(on_space=True) == Limits(
        max_file_bytes=1_500_000, max_runs_waiting=3, staging_days=2, run_days=30
    )


@pytest.mark.parametrize(
    ("variable", "value", "expects"),
    [
        ("LORA_GUI_MAX_FILES", "1.5", "a whole number of pictures, such as 1000"),
        ("LORA_GUI_MAX_FILE_MB", "lots", "a number of megabytes, such as 500"),
        ("LORA_GUI_MIN_FREE_GB", "-1", "a number of gigabytes, such as 2"),
        ("LORA_GUI_RUN_DAYS", "a month", "a whole number of days, such as 30"),
        ("LORA_GUI_MAX_STAGING_MB", "nan", "a number of megabytes, such as 2000"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_expects(environment, variable, value, expects):
    environment.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        Limits.from_environment(on_space=False)
    assert str(caught.value) == (
        f"{variable} must be {expects} (or 0, none or off for no limit), not {value!r}; "
        "fix it in the server's settings (on a Space: Settings, Variables and secrets) and restart"
    )


def test_every_limit_has_a_variable_and_a_row_in_the_table_the_readme_copies():
    assert [setting.field for setting in limits_module._SETTINGS] == [field.name for field in fields(Limits)]
    for setting in limits_module._SETTINGS:
        assert f"| `{setting.env}`" in limits_module.__doc__


def test_sizes_read_as_a_person_writes_them():
    assert [format_size(size) for size in (612_000_000, 1_234_000_000, 2_000_000_000, 25_000, 500)] == [
        "612 MB",
        "1.2 GB",
        "2 GB",
        "25 kB",
        "500 bytes",
    ]


# ---- staging ------------------------------------------------------------------------------------
def test_a_file_over_the_size_a_file_may_have_is_left_out_whether_dropped_zipped_or_a_zip(tmp_path):
    staging = shared_staging(tmp_path, Limits(max_file_bytes=500_000))
    big = picture(tmp_path / "drop" / "big.png", size=612_000, seed=1)
    fine = picture(tmp_path / "drop" / "fine.png", seed=2)
    zipped = tmp_path / "small.zip"  # small, but a picture in it unpacks too big
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(picture(tmp_path / "src" / "inside.png", size=700_000, seed=3), "set/inside.png")
        archive.write(picture(tmp_path / "src" / "ok.png", seed=4), "set/ok.png")
    huge_zip = tmp_path / "huge.zip"  # a zip over the limit itself, though what it holds would fit
    with zipfile.ZipFile(huge_zip, "w", zipfile.ZIP_STORED) as archive:
        for seed in range(5, 65):
            archive.write(picture(tmp_path / "many" / f"m{seed}.png", seed=seed), f"many/m{seed}.png")

    notes = staging.add_files([big, fine, zipped, huge_zip])
    over = "over the 500 kB a file may have here, so it was left out"
    assert sorted(notes) == [f"big.png: 612 kB, {over}", f"huge.zip: 606 kB, {over}", f"inside.png: 700 kB, {over}"]
    assert staged(staging) == ["fine.png", "set/ok.png"]


def test_pictures_past_the_count_limit_are_left_out_with_one_note(tmp_path):
    staging = shared_staging(tmp_path, Limits(max_staging_files=3))
    assert staging.add_files(pictures(tmp_path / "first", 2)) == []
    staging.items()  # the thumbnails the page draws are the app's, not the visitor's pictures
    assert (staging.folder / THUMBNAILS).is_dir()

    notes = staging.add_files(pictures(tmp_path / "second", 4, first_seed=3))
    assert notes == ["3 pictures were left out: this server keeps at most 3 pictures per visitor; remove some first"]
    assert staged(staging) == ["p1.png", "p2.png", "p3.png"]
    # A folder import counts what is staged already too; a picture already staged is no more, and one picture
    # left out reads as one.
    shutil.copy(tmp_path / "second" / "p3.png", picture(tmp_path / "third" / "p7.png", seed=7).with_name("p3.png"))
    assert staging.import_folder(tmp_path / "third") == [
        "1 picture was left out: this server keeps at most 3 pictures per visitor; remove some first"
    ]
    assert staged(staging) == ["p1.png", "p2.png", "p3.png"]


def test_pictures_past_the_size_quota_are_left_out_with_one_note_and_captions_count(tmp_path):
    staging = shared_staging(tmp_path, Limits(max_staging_bytes=30_000, max_staging_files=1000))
    assert staging.add_files(pictures(tmp_path / "first", 2)) == []
    staging.items()
    # 10 kB of room left: exactly one more picture; the owner's mark and the thumbnails don't count.
    notes = staging.add_files(pictures(tmp_path / "second", 3, first_seed=3))
    assert notes == [
        "2 pictures were left out: this server keeps at most 1000 pictures / 30 kB per visitor; remove some first"
    ]
    assert staged(staging) == ["p1.png", "p2.png", "p3.png"]

    staging.remove("p3.png")
    with_caption = picture(tmp_path / "third" / "c.png", seed=9)
    with_caption.with_suffix(".txt").write_text("a red circle", encoding="utf-8")
    notes = staging.add_files([with_caption, with_caption.with_suffix(".txt")])  # 10 kB and 13 bytes: too much
    assert notes == [
        "1 picture was left out: this server keeps at most 1000 pictures / 30 kB per visitor; remove some first"
    ]
    assert staged(staging) == ["p1.png", "p2.png"]


def test_caption_edits_count_in_the_visitors_quota_and_a_caption_has_a_longest(tmp_path):
    limits = Limits(max_staging_bytes=25_000, max_staging_files=3)
    staging = shared_staging(tmp_path, limits)
    assert staging.add_files(pictures(tmp_path / "first", 2)) == []
    # 5 kB of room left: a caption of 4,000 characters fits, two do not, and a bulk edit is all or nothing.
    staging.set_caption("p1.png", "a" * 3990)
    with pytest.raises(LoraGuiError, match="nothing was changed"):
        staging.fill_empty_captions("b" * 3990)
    assert [item.caption for item in staging.items()] == ["a" * 3990, ""]
    with pytest.raises(LoraGuiError, match="a caption may have at most 4,000"):
        staging.set_caption("p2.png", "c" * 4001)


def test_captions_dropped_apart_from_their_pictures_look_at_the_quota_once_and_fit_all_or_none(tmp_path, monkeypatch):
    """Hundreds of .txt files dropped after their pictures: one look at the visitor's folders for all of them (a look
    for each made a drop of n captions walk n times n files), and past the quota none is written, in one note."""
    staging = shared_staging(tmp_path, Limits(max_staging_files=1000))
    assert staging.add_files(pictures(tmp_path / "first", 3)) == []
    staging.limits = Limits(max_staging_bytes=staging_module._staged_size(staging.folder)[0] + 5000)  # 5 kB left
    captions = tmp_path / "captions"
    captions.mkdir()
    for name, text in (("p1", "a red circle"), ("p2", "a blue square"), ("nobody", "lost")):
        (captions / f"{name}.txt").write_text(text)
    walks = []
    staged_size = staging_module._staged_size
    monkeypatch.setattr(staging_module, "_staged_size", lambda folder: walks.append(folder) or staged_size(folder))
    notes = staging.add_files(sorted(captions.iterdir()))
    assert len(walks) == 2, "one look for the drop, one for its captions"
    assert notes == ["nobody.txt: no image named nobody to go with it; drop it with its image"]
    assert [item.caption for item in staging.items()] == ["a red circle", "a blue square", ""]
    for name in ("p1", "p2", "p3"):
        (captions / f"{name}.txt").write_text("z" * 3990)
    notes = staging.add_files(sorted(captions.glob("p*.txt")))
    assert len(notes) == 1 and "nothing was changed" in notes[0], notes
    assert [item.caption for item in staging.items()] == ["a red circle", "a blue square", ""]


def test_the_quota_counts_all_the_visitors_staging_folders(tmp_path):
    limits = Limits(max_staging_bytes=25_000, max_staging_files=3)
    assert shared_staging(tmp_path, limits).add_files(pictures(tmp_path / "first", 2)) == []
    # Another folder of the same visitor's (another tab, Try the demo) shares the quota; a stranger's does not.
    same = Staging.for_session(tmp_path / "runs", visitor=Visitor(owner="hf:someone"))
    same.limits = limits
    assert "left out" in " ".join(same.add_files(pictures(tmp_path / "second", 2, first_seed=3)))
    assert len(same.items()) == 0
    stranger = Staging.for_session(tmp_path / "runs", visitor=Visitor(owner="hf:stranger"))
    stranger.limits = limits
    assert stranger.add_files(pictures(tmp_path / "third", 2, first_seed=5)) == []


def test_a_zip_that_unpacks_bigger_than_the_room_left_is_refused_before_anything_is_extracted(tmp_path, monkeypatch):
    staging = shared_staging(tmp_path, Limits(max_staging_bytes=1_000_000))
    staging.add_files([picture(tmp_path / "first.png", seed=1)])
    archive = tmp_path / "pack.zip"  # a few kB that unpack to 2 MB: zeros compress well
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as packed:
        packed.write(picture(tmp_path / "src" / "big.png", size=1_995_000, seed=2), "big.png")
        packed.write(picture(tmp_path / "src" / "small.png", size=5_000, seed=3), "small.png")
    assert archive.stat().st_size < 50_000

    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(
        zipfile.ZipFile, "open", lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs)
    )
    assert staging.add_files([archive]) == [
        "pack.zip: it unpacks to 2 MB, but only 990 kB more fits in the 1 MB this server keeps per visitor, so "
        "nothing in it was added; remove some pictures first, or send a smaller zip"
    ]
    assert opened == [] and staged(staging) == ["first.png"]

    staging.limits = Limits(max_staging_bytes=3_000_000)  # the app sets the limits after making the folder
    assert staging.add_files([archive]) == []
    assert staged(staging) == ["big.png", "first.png", "small.png"]


def test_without_limits_staging_takes_everything(tmp_path):
    staging = Staging.for_session(tmp_path / "runs")
    assert staging.limits is None
    assert staging.add_files([*pictures(tmp_path / "drop", 5), picture(tmp_path / "big.png", size=700_000)]) == []
    assert len(staged(staging)) == 6


# ---- before a run starts ------------------------------------------------------------------------
def test_a_run_needs_the_free_disk_the_server_asks_for(tmp_path, monkeypatch):
    asked = []
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        asked.append(Path(path))
        return usage(100_000_000_000, 98_800_000_000, 1_200_000_000)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(LoraGuiError) as caught:
        check_free_disk(tmp_path / "runs", Limits(min_free_bytes=2_000_000_000))  # not made yet: its parent
    assert str(caught.value) == (
        "the server's disk has only 1.2 GB free, and a run needs at least 2 GB (its checkpoints and LoRA files): "
        "delete old runs in the Runs tab, or ask the server's owner to free space"
    )
    assert asked == [tmp_path]
    check_free_disk(tmp_path, Limits(min_free_bytes=1_000_000_000))
    check_free_disk(tmp_path, Limits())
    assert len(asked) == 2  # no limit: nothing to ask


def test_a_visitor_may_have_only_so_many_runs_queued_or_training():
    with pytest.raises(LoraGuiError) as caught:
        check_runs_waiting(1, Limits(max_runs_waiting=1))
    assert str(caught.value) == (
        "you already have 1 run queued or training, and this server takes at most 1 per visitor: "
        "wait for it to end (or stop it), then start this one"
    )
    with pytest.raises(LoraGuiError) as caught:
        check_runs_waiting(2, Limits(max_runs_waiting=2))
    assert str(caught.value) == (
        "you already have 2 runs queued or training, and this server takes at most 2 per visitor: "
        "wait for one to end (or stop it), then start this one"
    )
    check_runs_waiting(0, Limits(max_runs_waiting=1))
    check_runs_waiting(1, Limits(max_runs_waiting=2))
    check_runs_waiting(50, Limits())


def test_a_signed_in_visitors_runs_count_with_those_of_the_anonymous_id_their_browser_holds(tmp_path):
    from lora_gui.ui.folders import Folders

    job = namedtuple("Job", "owner done")
    running, ended = SimpleNamespace(is_set=lambda: False), SimpleNamespace(is_set=lambda: True)
    queue = [job("anon:before-signing-in", running), job("hf:someone", ended), job("anon:stranger", running)]
    engine = SimpleNamespace(jobs=SimpleNamespace(jobs=lambda: queue))
    folders = Folders(tmp_path, Limits(max_runs_waiting=1, max_runs_queued=3), engine)
    with pytest.raises(LoraGuiError, match="you already have 1 run"):
        folders.check_room_for_a_run(Visitor(owner="hf:someone", also=("anon:before-signing-in",)))
    folders.check_room_for_a_run(Visitor(owner="anon:newcomer"))
    queue.append(job("anon:third", running))
    with pytest.raises(LoraGuiError, match="the queue is full: this server queues at most 3 runs"):
        folders.check_room_for_a_run(Visitor(owner="anon:newcomer"))


# ---- cleanup ------------------------------------------------------------------------------------
def age(path: Path, days: float) -> None:
    """Make `path` and everything in it look last changed `days` before NOW (the folders last, as writing into
    a folder changes its time)."""
    when = NOW - days * DAY
    for inner in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        os.utime(inner, (when, when))
    os.utime(path, (when, when))


def test_staging_folders_untouched_for_too_long_are_deleted(tmp_path):
    runs = tmp_path / "runs"

    def folder_with_pictures(days: float) -> Staging:
        staging = Staging.for_session(runs, visitor=Visitor(owner="hf:someone"))
        staging.add_files(pictures(tmp_path / staging.session_id / "sub", 2))
        staging.import_folder(tmp_path / staging.session_id)
        age(staging.folder, days)
        return staging

    forgotten = folder_with_pictures(8)
    one_new_file = folder_with_pictures(8)
    os.utime(one_new_file.folder / "sub" / "p2.png", (NOW - DAY, NOW - DAY))
    one_removed = folder_with_pictures(8)  # removing a file changes only the folder's own time
    os.utime(one_removed.folder, (NOW - DAY, NOW - DAY))
    recent = folder_with_pictures(3)

    assert expire_staging(runs, Limits(staging_days=None), now=NOW) == []
    assert expire_staging(runs, Limits(staging_days=7), now=NOW) == [forgotten.session_id]
    assert not forgotten.folder.exists()
    assert all(staging.folder.is_dir() for staging in (one_new_file, one_removed, recent))
    assert expire_staging(tmp_path / "nowhere", Limits(staging_days=7), now=NOW) == []


def test_a_full_upload_folder_drops_its_oldest_files_past_the_grace_and_refuses_while_all_are_new(tmp_path):
    for name, minutes_old in [("old/a.png", 60), ("older/b.png", 120), ("new/c.png", 1)]:
        path = tmp_path / name
        path.parent.mkdir()
        path.write_bytes(bytes(4000))
        os.utime(path, (NOW - minutes_old * 60, NOW - minutes_old * 60))
    assert limits_module.make_upload_room(tmp_path, 20_000, now=NOW)  # under the limit: nothing goes
    assert limits_module.make_upload_room(tmp_path, 10_000, now=NOW)
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == [
        "new",
        "new/c.png",
        "old",
        "old/a.png",
    ]
    assert not limits_module.make_upload_room(tmp_path, 4000, now=NOW)  # what is left is all too new to drop
    assert (tmp_path / "new" / "c.png").is_file()
    assert limits_module.make_upload_room(tmp_path, None)


def test_runs_that_ended_long_ago_are_deleted_but_never_one_a_job_is_working_on(tmp_path):
    runs = tmp_path / "runs"

    def run(name: str, status: str | None, days: float) -> Path:
        folder = RunFolder(runs / name)
        folder.path.mkdir(parents=True)
        folder.config.write_text("{}", encoding="utf-8")
        (folder.path / "train.log").write_text("training\n", encoding="utf-8")
        age(folder.path, days)
        if status is not None:  # the time it ended, as the app writes it
            folder.write_status(status, time=NOW - days * DAY)
        return folder.path

    ended = {status: run(f"old-{status}", status, 40) for status in ("finished", "stopped", "failed", "cancelled")}
    killed = run("old-left-running-by-a-killed-app", "running", 40)  # reads as interrupted
    from_the_command_line = run("old-cli", None, 40)
    live = {run("old-running-now", "running", 40), run("old-failed-being-resumed", "failed", 40)}
    recent = run("new-finished", "finished", 10)
    log_still_growing = run("cli-training-now", None, 40)
    os.utime(log_still_growing / "train.log", (NOW - 60, NOW - 60))
    staging = Staging.for_session(runs)
    age(staging.folder, 40)

    def is_live(path: Path) -> bool:
        return path in live

    assert expire_runs(runs, Limits(run_days=None), is_live, now=NOW) == []
    deleted = expire_runs(runs, Limits(run_days=30), is_live, now=NOW)
    assert sorted(deleted) == sorted(path.name for path in [*ended.values(), killed, from_the_command_line])
    left = sorted(path.name for path in runs.iterdir())
    assert left == sorted([".staging", *(path.name for path in live), recent.name, log_still_growing.name])
