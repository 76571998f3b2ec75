"""The dataset doctor finds what was planted (a near-duplicate, a blurred picture, a small one, a panorama, a cut
caption, a missing or miswritten trigger word, identical captions), names the right files, leaves clean pictures
alone, applies its fixes, prints on the command line, and looks at each picture once, as a thumbnail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageFilter

from lora_gui import doctor
from lora_gui.cli import main
from lora_gui.demo import write_demo_dataset
from lora_gui.doctor import Finding, apply_fix, diagnose
from lora_gui.errors import DataError
from lora_gui.staging import Staging

pytestmark = pytest.mark.unit

CLEAN = [f"clean{i}.png" for i in range(6)]
LONG_CAPTION = "sks, " + " ".join(["a detailed photo of a small red toy on a wooden table"] * 10)


def textured(seed: int, size: tuple[int, int] = (640, 640)) -> Image.Image:
    """Coarse colour noise with discs on it: sharp edges everywhere, unlike any other seed's."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(20, 120))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def save(folder: Path, name: str, image: Image.Image, caption: str | None, **options) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, **options)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """Six clean pictures and one of each problem, captioned with the trigger word "sks" unless said otherwise."""
    folder = tmp_path / "set"
    for index, name in enumerate(CLEAN):
        save(folder, name, textured(index), f"sks, a photo number {index}")
    original = textured(100)
    save(folder, "original.png", original, "sks, the original")
    save(folder, "copy.jpg", original.resize((600, 600)), "sks, a resaved copy", quality=70)
    save(folder, "blurred.png", textured(101).filter(ImageFilter.GaussianBlur(3)), "sks, out of focus")
    save(folder, "small.png", textured(102, (300, 300)), "sks, a small one")
    save(folder, "panorama.png", textured(103, (1536, 512)), "sks, a wide view")
    save(folder, "long.png", textured(104), LONG_CAPTION)
    save(folder, "untagged.png", textured(105), "a photo of a toy")
    save(folder, "shouty.png", textured(106), "SKS, a loud one")
    return folder


def by_kind(findings: list[Finding]) -> dict[str, Finding]:
    kinds = [finding.kind for finding in findings]
    assert len(kinds) == len(set(kinds)), kinds  # one finding per kind, naming all its files
    return {finding.kind: finding for finding in findings}


def test_each_planted_problem_is_found_naming_its_files(planted):
    found = by_kind(diagnose(planted, 512, trigger="sks"))
    assert found["near-duplicate"].files == ("original.png", "copy.jpg")  # the larger one is kept
    assert found["near-duplicate"].fix == "keep-first"
    assert "keep original.png" in found["near-duplicate"].message
    assert found["blurry"].files == ("blurred.png",)
    assert found["too-small"].files == ("small.png",)
    assert "small.png (300x300)" in found["too-small"].message
    assert found["aspect-ratio"].files == ("panorama.png",)
    assert "panorama.png (3.0:1)" in found["aspect-ratio"].message
    assert found["caption-too-long"].files == ("long.png",)
    assert "more than the 77 the text encoder reads" in found["caption-too-long"].message
    assert found["trigger-missing"].files == ("untagged.png",)
    assert found["trigger-missing"].fix == "add-trigger"
    assert found["trigger-inconsistent"].files == ("shouty.png",)
    assert '"SKS" instead of "sks"' in found["trigger-inconsistent"].message
    assert found["buckets"].message.endswith("2 shapes: 13 in 512x512, 1 in 640x384.")
    assert found["buckets"].severity == "info"
    # Each sentence names its files; warnings come before what is only worth knowing.
    for finding in found.values():
        assert all(name in finding.message for name in finding.files[:5]), finding
    severities = [finding.severity for finding in diagnose(planted, 512, trigger="sks")]
    assert severities == sorted(severities, key=lambda severity: severity != "warning")
    # 14 pictures, all captioned, not all alike: nothing to say about those.
    assert not {"too-few", "too-many", "caption-empty", "captions-identical"} & set(found)


def test_clean_pictures_are_never_flagged(planted):
    flagged = {name for finding in diagnose(planted, 512, trigger="sks") for name in finding.files}
    assert not flagged & set(CLEAN)
    assert flagged == {
        "original.png",
        "copy.jpg",
        "blurred.png",
        "small.png",
        "panorama.png",
        "long.png",
        "untagged.png",
        "shouty.png",
    }


def test_the_demo_set_of_flat_shapes_is_clean(tmp_path):
    """Same-layout pictures of other colours are not duplicates, and a flat style is not blurry."""
    folder = write_demo_dataset(tmp_path / "demo", count=12, size=(160, 160))
    assert [finding.kind for finding in diagnose(folder, 128)] == ["buckets"]


def test_exact_copies_are_left_to_the_staging_checks(planted):
    (planted / "again.png").write_bytes((planted / "original.png").read_bytes())
    found = by_kind(diagnose(planted, 512, trigger="sks"))
    assert found["near-duplicate"].files == ("original.png", "copy.jpg")


def test_captions_that_are_all_the_same_or_missing(tmp_path):
    folder = tmp_path / "same"
    for index in range(3):
        save(folder, f"p{index}.png", textured(index, (512, 512)), "a photo of my dog")
    save(folder, "bare.png", textured(9, (512, 512)), None)
    found = by_kind(diagnose(folder, 512))
    assert found["captions-identical"].files == ("p0.png", "p1.png", "p2.png")
    assert '"a photo of my dog"' in found["captions-identical"].message
    assert found["caption-empty"].files == ("bare.png",)
    assert found["too-few"].message.startswith("Only 3 pictures: a LoRA of a person or object usually needs 10")
    # A default caption for all is a choice, not a slip; the bare picture gets it.
    found = by_kind(diagnose(folder, 512, default_caption="a photo of my dog"))
    assert "captions-identical" not in found and "caption-empty" not in found


def test_too_many_pictures_and_all_too_small(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "SUBJECT_PICTURES", (1, 2))
    monkeypatch.setattr(doctor, "STYLE_PICTURES", (2, 3))
    folder = write_demo_dataset(tmp_path / "demo", count=4, size=(160, 160))
    found = by_kind(diagnose(folder, 512))
    assert found["too-many"].severity == "info"
    assert found["too-small"].fix is None  # no picture to remove: the resolution is what to change
    assert "set the resolution to 128 px" in found["too-small"].message


def test_flux_reads_longer_captions_than_clip(planted):
    kinds = {finding.kind for finding in diagnose(planted, 512, family="flux", trigger="sks")}
    assert "caption-too-long" not in kinds
    assert doctor.approximate_tokens("a photo, of 12 dogs") == 2 + 7


def test_apply_fix_does_what_it_says(planted):
    found = by_kind(diagnose(planted, 512, trigger="sks"))
    said = apply_fix(planted, found["near-duplicate"])
    assert said == "Kept original.png. Removed copy.jpg, with its caption."
    assert (planted / "original.png").is_file() and not (planted / "copy.jpg").exists()
    assert not (planted / "copy.txt").exists()
    assert apply_fix(planted, found["blurry"]) == "Removed blurred.png, with its caption."
    assert not (planted / "blurred.png").exists() and not (planted / "blurred.txt").exists()
    assert apply_fix(planted, found["trigger-missing"], trigger="sks") == 'Put "sks" in front of 1 caption.'
    assert (planted / "untagged.txt").read_text(encoding="utf-8") == "sks, a photo of a toy\n"
    assert apply_fix(planted, found["trigger-inconsistent"], trigger="sks").endswith("in 1 caption.")
    assert (planted / "shouty.txt").read_text(encoding="utf-8") == "sks, a loud one\n"
    after = {finding.kind for finding in diagnose(planted, 512, trigger="sks")}
    assert not {"near-duplicate", "blurry", "trigger-missing", "trigger-inconsistent"} & after
    # A fix for files already gone, one that needs a trigger word, one there is none for: plain errors.
    with pytest.raises(DataError, match="not in this dataset"):
        apply_fix(planted, found["near-duplicate"])
    with pytest.raises(DataError, match="type the trigger word"):
        apply_fix(planted, found["trigger-missing"])
    with pytest.raises(DataError, match="no one-click fix"):
        apply_fix(planted, found["caption-too-long"])


def test_the_command_line_prints_one_finding_a_line(planted, capsys):
    assert main(["doctor", str(planted), "--resolution", "512", "--trigger", "sks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(diagnose(planted, 512, trigger="sks"))
    assert "warning: original.png, copy.jpg: original.png and copy.jpg are nearly the same picture" in lines[0]
    assert any(line.startswith("warning: blurred.png: blurred.png looks blurry") for line in lines)
    assert lines[-1].startswith("info: Training batches pictures of one shape together; at 512 px")


def test_the_command_line_says_when_the_folder_is_missing(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "nowhere")]) == 1
    assert "the image folder" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_each_picture_is_decoded_once_and_small(tmp_path, monkeypatch):
    """200 JPEGs of 512 px: each decoded once, at half size (the draft), and not at all on a second look."""
    folder = tmp_path / "many"
    rng = np.random.default_rng(0)
    for index in range(200):
        blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        save(folder, f"{index:03d}.jpg", Image.fromarray(blocks).resize((512, 512)), f"picture {index}")
    decoded: list[tuple[int, int]] = []
    full_load = ImageFile.ImageFile.load

    def spy(image):
        if image.tile:  # pixels still to decode (a loaded picture has none)
            decoded.append(image.size)
        return full_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    first = diagnose(folder, 256)
    assert len(decoded) == 200 and max(max(size) for size in decoded) <= 256
    decoded.clear()
    assert diagnose(folder, 256) == first
    assert decoded == []


def test_edit_pairs_missing_a_partner_showing_no_change_or_of_two_shapes_are_found_with_their_fixes(tmp_path, capsys):
    """Pairs as a folder with before/ and after/ (the staging folder's own, and the command line's --control-data):
    the same instruction on every pair is no slip, an edit as small as a logo is a change, and each finding's fix
    removes what it names."""
    pairs, edit = tmp_path / "pairs", "make it colourful"
    for seed, name in enumerate(("coloured", "unchanged", "reshaped", "alone", "logo")):
        save(pairs / "after", f"{name}.png", textured(seed, (256, 256)), edit)
    save(pairs / "before", "coloured.jpg", textured(0, (256, 256)).convert("L"), None)
    save(pairs / "before", "unchanged.png", textured(1, (256, 256)), None)
    save(pairs / "before", "reshaped.png", textured(2, (256, 192)), None)
    logo = textured(4, (256, 256))
    ImageDraw.Draw(logo).ellipse((200, 200, 240, 240), fill=(255, 255, 255))  # 2% of the picture
    save(pairs / "before", "logo.png", logo, None)
    save(pairs / "before", "stray.png", textured(5, (256, 256)), None)
    staging = Staging.for_session(tmp_path / "runs")
    staging.import_folder(pairs)

    found = by_kind(diagnose(staging.folder, 256))

    assert "captions-identical" not in found
    assert found["pair-no-before"].files == ("alone.png",)
    assert found["pair-no-before"].message.startswith("alone.png has no before picture")
    assert found["pair-no-after"].files == ("stray.png",) and found["pair-no-after"].fix == "remove-before"
    assert found["pair-unchanged"].files == ("unchanged.png",)
    assert "shows no change to learn" in found["pair-unchanged"].message
    assert found["pair-shape"].files == ("reshaped.png",)
    assert found["pair-shape"].message.startswith("The pair reshaped.png (before 256x192, after 256x256) differs")
    assert main(["doctor", str(pairs / "after"), "--control-data", str(pairs / "before"), "--resolution", "256"]) == 0
    printed = capsys.readouterr().out
    assert "warning: stray.png: The before picture stray.png has no after picture of its name" in printed
    assert apply_fix(staging, found["pair-no-after"]) == "Removed the before picture stray.png."
    assert apply_fix(staging, found["pair-unchanged"]) == "Removed unchanged.png, with its caption."
    assert staging.before_pictures() == ["coloured.jpg", "logo.png", "reshaped.png"]  # the pair went whole
    left = {finding.kind for finding in diagnose(staging.folder, 256)}
    assert not {"pair-no-after", "pair-unchanged"} & left and {"pair-no-before", "pair-shape"} <= left
