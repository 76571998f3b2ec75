"""The app's staged dataset: dropped files land on disk with their captions, edits are saved at once,
the checks name every problem, and nothing escapes the staging folder."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from PIL import ImageFile

from lora_gui import data
from lora_gui.demo import draw_shape
from lora_gui.errors import DataError
from lora_gui.limits import Limits
from lora_gui.owners import Visitor
from lora_gui.staging import STAGING_DIR, Staging

pytestmark = pytest.mark.unit


def picture(path: Path, size=(96, 96), seed=1, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape("circle", (220, 40, 40), size, seed=seed).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def dropped(*pictures: Path) -> list[Path]:
    """The pictures as a person drops them: each with its caption file, if it has one."""
    return [file for path in pictures for file in (path, path.with_suffix(".txt")) if file.exists()]


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    return Staging.for_session(tmp_path / "runs")


def captions(staging: Staging) -> dict[str, str]:
    return {item.relpath: item.caption for item in staging.items()}


def test_dropped_pictures_keep_their_captions_and_same_names_never_overwrite(staging, tmp_path):
    first = picture(tmp_path / "one" / "dog.png", seed=1)
    caption = first.with_suffix(".txt")
    caption.write_text("a photo of a dog\n", encoding="utf-8")
    other = picture(tmp_path / "two" / "dog.png", seed=2)  # another picture with the same name
    notes = staging.add_files([first, caption, other, tmp_path / "notes.docx"])
    assert captions(staging) == {"dog.png": "a photo of a dog", "dog-2.png": ""}
    assert notes == ["notes.docx: not an image, a .txt caption or a .zip, so it was left out"]
    # The same file dropped again is not added twice; a caption dropped later finds its picture.
    late = tmp_path / "three" / "dog-2.txt"
    late.parent.mkdir()
    late.write_text("a second dog", encoding="utf-8")
    staging.add_files([first, late])
    assert captions(staging) == {"dog.png": "a photo of a dog", "dog-2.png": "a second dog"}
    assert all(item.thumbnail and item.thumbnail.is_file() for item in staging.items())


def test_a_zip_unpacks_with_subfolders_and_cannot_write_outside(staging, tmp_path):
    picture(tmp_path / "src" / "a.png", caption="first")
    archive = tmp_path / "pictures.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(tmp_path / "src" / "a.png", "set/a.png")
        zipped.write(tmp_path / "src" / "a.txt", "set/a.txt")
        zipped.writestr("../escape.png", b"x")
        zipped.writestr("__MACOSX/set/._a.png", b"x")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip")
    notes = staging.add_files([archive, broken])
    assert captions(staging) == {"set/a.png": "first"}
    assert not (staging.folder.parent / "escape.png").exists()
    assert len(notes) == 1 and notes[0].startswith("broken.zip: not a readable .zip file")


def test_a_folder_import_reads_metadata_captions_and_leaves_the_folder_alone(staging, tmp_path):
    source = tmp_path / "photos"
    picture(source / "x.png")
    picture(source / "sub" / "y.png", seed=3)
    (source / "metadata.jsonl").write_text(
        '{"file_name": "x.png", "text": "an x"}\n{"file_name": "sub/y.png", "text": "a y"}\n', encoding="utf-8"
    )
    before = sorted(p.name for p in source.rglob("*"))
    assert staging.import_folder(source) == []
    assert captions(staging) == {"sub/y.png": "a y", "x.png": "an x"}
    staging.set_caption("x.png", "  an   edited x ")
    assert captions(staging)["x.png"] == "an edited x"
    assert sorted(p.name for p in source.rglob("*")) == before
    with pytest.raises(DataError, match="does not exist"):
        staging.import_folder(tmp_path / "nowhere")


def test_bulk_caption_tools(staging, tmp_path):
    staging.add_files(dropped(picture(tmp_path / "a.png", caption="a red circle"), picture(tmp_path / "b.png", seed=2)))
    assert staging.fill_empty_captions("a circle") == 1
    assert staging.add_trigger_word("sks") == 2
    assert staging.add_trigger_word("sks") == 0  # already there: not added twice
    assert staging.replace_in_captions("circle", "ball") == 2
    assert captions(staging) == {"a.png": "sks, a red ball", "b.png": "sks, a ball"}
    with pytest.raises(DataError, match="type the trigger word"):
        staging.add_trigger_word(" ")


def test_checks_name_every_problem(staging, tmp_path):
    staging.add_files(
        dropped(
            picture(tmp_path / "good.png", size=(300, 200), caption="fine"),
            picture(tmp_path / "same.png", size=(300, 200), caption="fine too"),  # byte-identical to good.png
            picture(tmp_path / "small.png", size=(64, 64), seed=5, caption="small"),
            picture(tmp_path / "bare.png", seed=6),
        )
    )
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a picture")
    staging.add_files([broken])
    report = staging.check(resolution=128)
    assert sorted(e.relpath for e in report.usable) == ["good.png", "same.png", "small.png"]
    assert report.uncaptioned == ["bare.png"]
    assert [(s.name, s.reason) for s in report.unusable] == [
        ("broken.jpg", "not an image file, or a format that can't be read")
    ]
    assert report.duplicates == [["good.png", "same.png"]]
    assert [e.relpath for e in report.too_small] == ["small.png"]
    broken_item = next(item for item in staging.items() if item.relpath == "broken.jpg")
    assert broken_item.thumbnail is None and "not an image" in broken_item.problem


def test_session_ids_and_removing(staging, tmp_path):
    staging.add_files(dropped(picture(tmp_path / "a.png", caption="a")))
    runs = tmp_path / "runs"
    assert Staging.find(runs, staging.session_id).folder == staging.folder
    assert Staging.find(runs, "../../etc") is None
    assert Staging.for_session(runs, "../../etc").folder.parent == runs / STAGING_DIR
    staging.remove("a.png")
    assert staging.items() == []
    with pytest.raises(DataError, match="not in this dataset"):
        staging.set_caption("../../a.png", "x")


def test_hidden_and_os_files_are_passed_over_by_the_scan_the_import_the_zip_and_the_listing(staging, tmp_path):
    source = tmp_path / "from-a-mac"
    picture(source / "a.png", caption="a")
    for name in ("__MACOSX/a.png", "__MACOSX/._a.png", "._a.png", ".hidden/b.png", "sub/.c.png"):
        picture(source / name, seed=2, caption="not the user's")  # real pictures, in places no user put them
    for name in (".DS_Store", "sub/Thumbs.db", "desktop.ini"):
        (source / name).write_bytes(b"\0junk")
    assert [e.relpath for e in data.scan_folder(source).examples] == ["a.png"]
    assert data.scan_folder(source).skipped == []

    assert staging.import_folder(source) == []
    archive = tmp_path / "from-a-mac.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in source.rglob("*"):
            if path.is_file():
                zipped.write(path, f"set/{path.relative_to(source).as_posix()}")
    assert staging.add_files([archive, source / "._a.png", source / ".DS_Store", source / "desktop.ini"]) == []
    picture(staging.folder / "__MACOSX" / "x.png")  # even put straight into the folder
    assert captions(staging) == {"a.png": "a", "set/a.png": "a"}
    assert not (staging.folder / "set" / "__MACOSX").exists() and not (staging.folder / "Thumbs.db").exists()


def test_a_caption_edit_and_its_recount_decode_and_hash_nothing(staging, tmp_path, monkeypatch):
    staging.add_files(
        dropped(
            picture(tmp_path / "a.png", size=(300, 200), caption="a"),
            picture(tmp_path / "same.png", size=(300, 200), caption="a copy"),  # byte-identical: hashed once
            picture(tmp_path / "bare.jpg", size=(200, 100), seed=4),
        )
    )
    staging.items()  # the thumbnails, as the Dataset tab draws them after a drop
    assert staging.check(resolution=128).duplicates == [["a.png", "same.png"]]

    decoded, opened, hashed = [], [], []
    real_load, real_hash = ImageFile.ImageFile.load, data._file_hash.work_out
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or real_load(image))
    monkeypatch.setattr(data, "open_image", lambda *args, **kwargs: opened.append(args))
    monkeypatch.setattr(data._file_hash, "work_out", lambda path: hashed.append(path) or real_hash(path))
    staging.set_caption("bare.jpg", "a bare picture")
    report = staging.check(resolution=128)  # what the Dataset tab shows after the edit
    assert sorted(e.relpath for e in report.usable) == ["a.png", "bare.jpg", "same.png"]
    assert report.uncaptioned == [] and report.duplicates == [["a.png", "same.png"]]
    assert report.usable[1].size == (200, 100)
    assert (decoded, opened, hashed) == ([], [], [])


def test_pictures_training_cant_read_are_never_kept_an_svg_least_of_all(staging, tmp_path):
    """The staging folder is served to the page: an SVG kept there would run its script in the app's origin."""
    svg = tmp_path / "drawing.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>')
    gif = tmp_path / "anim.gif"
    draw_shape("circle", (220, 40, 40), (96, 96), seed=2).save(gif)
    archive = tmp_path / "pack.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        packed.write(svg, "inside/drawing.svg")
        packed.write(picture(tmp_path / "ok.png", caption="fine"), "inside/ok.png")

    notes = staging.add_files([svg, gif, archive])
    refused = "{}: .{} images are not supported (convert it to PNG or JPG), so it was left out"
    assert sorted(notes) == [refused.format("anim.gif", "gif"), *[refused.format("drawing.svg", "svg")] * 2]
    kept = sorted(path.relative_to(staging.folder).as_posix() for path in staging.folder.rglob("*") if path.is_file())
    assert kept == ["inside/ok.png"]


def test_edit_pairs_split_from_a_zip_stay_apart_from_the_pictures_pair_by_name_and_go_whole(tmp_path):
    """A zip of a folder with before/ and after/ is split by itself: the before pictures are kept where the pictures'
    walk never looks (and in the visitor's quota), paired by name in any format, and a pair is removed whole."""
    pairs = tmp_path / "pairs"
    for name in ("cat", "dog", "owl"):
        picture(pairs / "after" / f"{name}.png", seed=len(name) + ord(name[0]), caption="make it grey")
    picture(pairs / "before" / "cat.jpg", seed=1)
    picture(pairs / "before" / "dog.png", size=(96, 64), seed=2)  # another shape than its after picture
    picture(pairs / "before" / "fox.png", seed=3)  # no after picture of its name
    archive = tmp_path / "pairs.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in pairs.rglob("*.*"):
            zipped.write(path, path.relative_to(tmp_path).as_posix())
    staging = Staging.for_session(tmp_path / "runs", visitor=Visitor("a"))
    staging.limits = Limits(max_staging_files=5)  # 3 after pictures and 3 before pictures: one is left out

    notes = staging.add_files([archive])

    assert notes == ["1 picture was left out: this server keeps at most 5 pictures per visitor; remove some first"]
    assert captions(staging) == {f"{name}.png": "make it grey" for name in ("cat", "dog", "owl")}
    assert staging.before_pictures() == ["cat.jpg", "dog.png"]
    staging.limits = None
    assert staging.add_files([pairs / "before" / "fox.png", pairs / "after" / "cat.txt"], before=True) == [
        "cat.txt: a caption goes with its after picture; drop it with the pictures above"
    ]
    report = staging.check(resolution=64)
    assert report.paired and [e.relpath for e in report.usable] == ["cat.png", "dog.png"]
    assert [e.control.name for e in report.usable] == ["cat.jpg", "dog.png"]
    assert (report.no_before, report.no_after) == (["owl.png"], ["fox.png"])
    assert report.reshaped == ["dog.png: before 96x64, after 96x96"]

    # A before picture dropped again under its name, in another format, replaces the one there.
    picture(tmp_path / "again" / "CAT.png", seed=9)
    staging.add_files([tmp_path / "again" / "CAT.png"], before=True)
    assert staging.before_pictures() == ["CAT.png", "dog.png", "fox.png"]
    staging.remove("cat.png")
    assert staging.before_pictures() == ["dog.png", "fox.png"]
    staging.remove_before("fox.png")
    with pytest.raises(DataError, match="not in this dataset"):
        staging.remove_before("../dog.png")
    assert Staging.find(tmp_path / "runs", staging.session_id, Visitor("b")) is None  # nor its before pictures
    staging.clear()
    assert staging.before_pictures() == [] and not staging.check(resolution=64).paired

    # The two halves zipped from folders named otherwise: a before picture goes beside the after picture of its name.
    for folder, half, before in (("pics", "after/cat.png", False), ("my-befores", "before/cat.jpg", True)):
        zipped_folder = tmp_path / f"{folder}.zip"
        with zipfile.ZipFile(zipped_folder, "w") as zipped:
            zipped.write(pairs / half, f"{folder}/{Path(half).name}")
            zipped.write(pairs / "after" / "cat.txt", f"{folder}/cat.txt")
        staging.add_files([zipped_folder], before=before)
    assert staging.before_pictures() == ["pics/cat.jpg"]
    assert [example.relpath for example in staging.check(resolution=64).usable] == ["pics/cat.png"]
