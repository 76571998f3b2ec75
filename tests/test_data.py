"""Training images: every kind of bad file is skipped with its reason; odd formats convert right."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lora_gui.atomic import atomic_folder
from lora_gui.batching import BatchOrder, assign_buckets, bucket_sizes, fit_to_bucket
from lora_gui.data import CUT_OFF, MIN_SIDE, full_caption, open_image, scan_folder
from lora_gui.demo import draw_shape
from lora_gui.errors import DataError
from lora_gui.run_dataset import copy_into_run, scan_source

pytestmark = pytest.mark.unit


def save(folder: Path, name: str, image: Image.Image, caption: str | None = "a photo", **save_args) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def shape(size=(80, 64)) -> Image.Image:
    return draw_shape("circle", (220, 40, 40), size, seed=1)


def test_each_kind_of_bad_file_is_skipped_with_its_reason(tmp_path):
    good = save(tmp_path, "good.png", shape())
    (tmp_path / "text.jpg").write_text("not an image at all")
    (tmp_path / "text.txt").write_text("a caption")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("a caption")
    full = io.BytesIO()
    shape((200, 200)).save(full, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (tmp_path / "cut.txt").write_text("a caption")
    save(tmp_path, "tiny.png", shape((16, 16)))
    save(tmp_path, "huge.png", Image.new("1", (9000, 9000)))  # 81 megapixels, a few kB on disk
    save(tmp_path, "nocaption.png", shape(), caption=None)
    save(tmp_path, "anim.gif", shape())
    save(tmp_path, ".hidden.png", shape())

    scan = scan_folder(tmp_path)

    assert [e.path for e in scan.examples] == [good]
    reasons = {s.name: s.reason for s in scan.skipped}
    assert reasons["text.jpg"].startswith("not an image")
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["cut.jpg"].startswith("truncated or damaged")
    assert reasons["tiny.png"].startswith(f"too small (16x16 px; needs at least {MIN_SIDE} px")
    assert reasons["huge.png"].startswith("too large (9000x9000 px")
    assert reasons["nocaption.png"].startswith("no caption (no nocaption.txt beside it")
    assert reasons["anim.gif"].startswith(".gif images are not supported")
    assert ".hidden.png" not in reasons, "hidden files (.DS_Store, ._name) are not the user's images"


def test_checks_read_headers_only(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned: the 120x60 picture stands 60x120
    save(tmp_path, "turned.jpg", shape((120, 60)), exif=exif.tobytes())
    save(tmp_path, "turned.png", shape((120, 60)), exif=exif.tobytes())
    save(tmp_path, "c.webp", shape(), format="WEBP")
    save(tmp_path, "d.bmp", shape())
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or real_load(image))
    scan = scan_folder(tmp_path)
    assert [(e.relpath, e.size) for e in scan.examples] == [
        ("c.webp", (80, 64)),
        ("d.bmp", (80, 64)),
        ("turned.jpg", (60, 120)),
        ("turned.png", (60, 120)),
    ]
    assert decoded == []


def test_cut_off_files_are_told_from_their_ends_and_data_after_the_end_is_fine(tmp_path):
    for name, fmt in [("cut.png", "PNG"), ("cut.webp", "WEBP"), ("cut.jpg", "JPEG")]:
        whole = io.BytesIO()
        draw_shape("square", (40, 80, 220), (300, 300), seed=2).save(whole, format=fmt)
        (tmp_path / name).write_bytes(whole.getvalue()[: len(whole.getvalue()) * 3 // 4])
        (tmp_path / name).with_suffix(".txt").write_text("a photo")
    # A phone's motion photo: a whole JPEG with a video after its end marker.
    motion = save(tmp_path, "motion.jpg", shape((300, 300)))
    motion.write_bytes(motion.read_bytes() + b"ftypmp42" + os.urandom(5000))
    scan = scan_folder(tmp_path)
    reasons = {s.name: s.reason for s in scan.skipped}
    assert reasons["cut.jpg"] == reasons["cut.png"] == CUT_OFF
    assert reasons["cut.webp"].startswith("damaged image")  # Pillow reads a WebP whole to open it
    assert [e.relpath for e in scan.examples] == ["motion.jpg"]


def test_checks_are_remembered_per_file_until_it_changes(tmp_path, monkeypatch):
    path = save(tmp_path, "a.png", shape((80, 64)))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs))
    assert scan_folder(tmp_path).examples[0].size == (80, 64)
    assert scan_folder(tmp_path).examples[0].size == (80, 64)
    assert len(opened) == 1, "an unchanged file is read once"
    # Replaced by renaming a new file over it, as the staging folder does: a new file, even at the same size.
    shape((64, 80)).save(tmp_path / "new.png")
    os.replace(tmp_path / "new.png", path)
    assert scan_folder(tmp_path).examples[0].size == (64, 80)
    # Rewritten in place.
    path.write_bytes(path.read_bytes()[:300])
    assert scan_folder(tmp_path).skipped[0].reason == CUT_OFF
    assert len(opened) == 3


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    save(tmp_path, "bomb.png", shape((100, 100)))
    scan = scan_folder(tmp_path)
    assert scan.skipped[0].reason.startswith("too large")


def test_default_caption_fills_missing_captions(tmp_path):
    save(tmp_path, "a.png", shape(), caption=None)
    save(tmp_path, "b.png", shape(), caption="   ")  # an empty caption file counts as none
    scan = scan_folder(tmp_path, default_caption="a photo of sks toy")
    assert [e.caption for e in scan.examples] == ["a photo of sks toy"] * 2


def test_every_extension_and_letter_case_and_subfolders(tmp_path):
    for name, fmt in [
        ("a.JPG", "JPEG"),
        ("b.jpeg", "JPEG"),
        ("c.PNG", "PNG"),
        ("sub/d.webp", "WEBP"),
        ("sub/deeper/e.BMP", "BMP"),
    ]:
        save(tmp_path, name, shape(), format=fmt)
    scan = scan_folder(tmp_path)
    assert sorted(e.relpath for e in scan.examples) == ["a.JPG", "b.jpeg", "c.PNG", "sub/d.webp", "sub/deeper/e.BMP"]
    assert not scan.skipped


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored 120x60 picture is shown 60x120
    save(tmp_path, "rotated.jpg", shape((120, 60)), exif=exif.tobytes())
    assert open_image(tmp_path / "rotated.jpg").size == (60, 120)
    assert scan_folder(tmp_path).examples[0].size == (60, 120)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("RGBA", (64, 64), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (64, 64), (255, 0, 0, 255)), (255, 0, 0)),
        (lambda: Image.new("LA", (64, 64), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("L", (64, 64), 100), (100, 100, 100)),
        (lambda: Image.new("I;16", (64, 64), 32896), (128, 128, 128)),  # 16-bit mid gray, not clipped white
        (lambda: Image.new("CMYK", (64, 64), (0, 255, 255, 0)), (255, 0, 0)),  # CMYK red
    ],
    ids=["rgba-clear", "rgba-opaque", "gray-alpha", "gray", "16-bit", "cmyk"],
)
def test_modes_convert_to_the_right_rgb(tmp_path, make, expected):
    image = make()
    path = tmp_path / ("x.jpg" if image.mode == "CMYK" else "x.png")
    image.save(path)
    converted = open_image(path)
    assert converted.mode == "RGB"
    np.testing.assert_allclose(np.asarray(converted)[32, 32], expected, atol=3)


def test_palette_with_transparency_goes_on_white(tmp_path):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    assert tuple(np.asarray(open_image(tmp_path / "p.png"))[0, 0]) == (255, 255, 255)


def test_metadata_jsonl_and_csv_captions(tmp_path):
    jsonl = tmp_path / "jsonl"
    save(jsonl, "one.png", shape(), caption=None)
    save(jsonl, "sub/two.png", shape(), caption=None)
    save(jsonl, "three.png", shape(), caption=None)
    rows = [{"file_name": "one.png", "text": "first"}, {"file_name": "sub/two.png", "text": "second"}]
    (jsonl / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    scan = scan_folder(jsonl)
    assert {e.relpath: e.caption for e in scan.examples} == {"one.png": "first", "sub/two.png": "second"}
    assert scan.skipped[0].name == "three.png" and "no line in the metadata file" in scan.skipped[0].reason

    table = tmp_path / "csv"
    save(table, "one.png", shape(), caption=None)
    (table / "metadata.csv").write_text('file_name,text\none.png,"a photo, with a comma"\n')
    assert scan_folder(table).examples[0].caption == "a photo, with a comma"


def test_broken_metadata_is_a_plain_error(tmp_path):
    save(tmp_path, "one.png", shape(), caption=None)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "one.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 2 is not valid JSON"):
        scan_folder(tmp_path)


def test_hugging_face_dataset_with_image_and_caption_columns(tmp_path):
    import datasets

    buffer = io.BytesIO()
    shape().save(buffer, format="PNG")
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": buffer.getvalue(), "path": None}] * 2 + [{"bytes": b"junk", "path": None}],
            "caption": ["one", "two", "three"],
        },
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    repo = tmp_path / "hub-dataset"
    (repo / "data").mkdir(parents=True)
    table.to_parquet(repo / "data/train-00000-of-00001.parquet")

    scan = scan_source(str(repo))
    assert [e.caption for e in scan.examples] == ["one", "two"]
    assert scan.skipped[0].name == "row 2" and scan.skipped[0].reason.startswith("not an image")
    copied = copy_into_run(scan, tmp_path / "run/dataset")
    assert sorted(p.name for p in (tmp_path / "run/dataset").iterdir()) == [
        "000000.png",
        "000000.txt",
        "000001.png",
        "000001.txt",
    ]
    assert [e.caption for e in scan_folder(tmp_path / "run/dataset").examples] == [e.caption for e in copied.examples]


def test_the_run_copy_is_written_whole_with_hard_links_or_else_copies(tmp_path, monkeypatch):
    source = tmp_path / "staged"
    save(source, "a.png", shape())
    save(source, "sub/b.png", shape((64, 64)), caption=None)
    scan = scan_folder(source, default_caption="a default")
    dataset = tmp_path / "run" / "dataset"
    copied = copy_into_run(scan, dataset, link=True)
    assert [e.path for e in copied.examples] == [dataset / "a.png", dataset / "sub/b.png"]
    assert (dataset / "sub/b.txt").read_text() == "a default\n"
    assert os.stat(dataset / "a.png").st_ino == os.stat(source / "a.png").st_ino
    assert sorted(p.name for p in dataset.parent.iterdir()) == ["dataset"], "no temporary folder left"

    def no_links(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)  # another disk: copies
    copy_into_run(scan, dataset, link=True)
    assert os.stat(dataset / "a.png").st_ino != os.stat(source / "a.png").st_ino
    assert (dataset / "a.png").read_bytes() == (source / "a.png").read_bytes()


def test_a_folder_written_atomically_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "folder"
    with pytest.raises(RuntimeError), atomic_folder(target) as building:
        (building / "half.txt").write_text("half")
        raise RuntimeError("crashed halfway")
    assert not target.exists() and list(target.parent.iterdir()) == [], "nothing half-written left"
    with atomic_folder(target) as building:
        (building / "a.txt").write_text("a")
        assert not target.exists()
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with atomic_folder(target) as building:  # its writer's: replaced whole
        (building / "b.txt").write_text("b")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    # Writers racing to make the same folder: the first one's stays, a later one's is dropped.
    with pytest.raises(OSError), atomic_folder(target, replace=False) as building:
        (building / "c.txt").write_text("c")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["folder"], "no temporary folder left"


def test_unusable_sources_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_source(str(tmp_path / "nowhere"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        scan_source(str(tmp_path / "file.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        scan_source(str(empty))
    save(empty, "a.png", shape(), caption=None)
    (empty / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"every file was skipped \(1 no caption; 1 empty file\).*default caption"):
        scan_source(str(empty))
    with pytest.raises(DataError, match="no training images chosen"):
        scan_source("  ")


def test_scan_reports_duplicates_and_small_images(tmp_path):
    save(tmp_path, "a.png", shape((300, 300)))
    save(tmp_path, "copy-of-a.png", shape((300, 300)))
    save(tmp_path, "small.png", shape((100, 200)))
    scan = scan_folder(tmp_path)
    assert scan.duplicates() == [["a.png", "copy-of-a.png"]]
    assert [e.relpath for e in scan.smaller_than(256)] == ["small.png"]


def test_buckets_keep_the_shape_and_record_the_crop():
    sizes = bucket_sizes(512, step=64)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 2 for w, h in sizes)

    class Item:
        def __init__(self, size):
            self.size = size

    wide, tall, square = Item((1200, 700)), Item((700, 1200)), Item((800, 800))
    assert assign_buckets([wide, tall, square], 512, 64, aspect_buckets=True) == [(640, 384), (384, 640), (512, 512)]
    assert assign_buckets([wide, tall], 512, 64, aspect_buckets=False) == [(512, 512)] * 2

    cropped, geometry = fit_to_bucket(shape((1200, 700)), (640, 384))
    assert cropped.size == (640, 384)
    assert geometry.original_size == (700, 1200) and geometry.target_size == (384, 640)
    # 1200x700 scaled to cover 640x384 is 658x384: 9 px cut from the left (center crop).
    assert geometry.crop_top_left == (0, 9)


def test_batches_hold_one_bucket_and_follow_only_the_seed():
    buckets = [(64, 64)] * 5 + [(96, 48)] * 3
    order = BatchOrder(buckets, batch_size=2, seed=3)
    assert order.batches_per_epoch == 5  # 3 + 2 batches
    epoch = [order(i) for i in range(5)]
    assert sorted(i for batch in epoch for i in batch) == list(range(8))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch)
    assert [BatchOrder(buckets, 2, 3)(i) for i in range(12)] == [order(i) for i in range(12)]
    assert [order(i) for i in range(5, 10)] != epoch, "each epoch is shuffled anew"


def test_trigger_word_goes_in_front_once():
    assert full_caption("a photo of a dog", "sks") == "sks, a photo of a dog"
    assert full_caption("sks, a photo of a dog", "sks") == "sks, a photo of a dog"
    assert full_caption("sks: make the shape pink", "sks") == "sks: make the shape pink", "an edit's instruction"
    assert full_caption("a photo of sksy", "sks") == "sks, a photo of sksy"
    assert full_caption("", "sks") == "sks"
    assert full_caption("a photo", "") == "a photo"
