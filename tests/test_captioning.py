"""Captioning, offline: a tiny WD tagger written here in the real layout (model.onnx and selected_tags.csv) and
loaded by the code that loads SmilingWolf's, from a folder, the download cache or the (fake) Hub; a folder of
pictures captioned without losing a word the user typed; `caption` and `train --caption-missing` on the command
line."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers.hub import FakeHub, in_download_cache, serve
from helpers.runs import train_argv
from PIL import Image

from lora_gui import data
from lora_gui.captioning import load_captioner
from lora_gui.captioning.folder import IN_METADATA, NOTHING_CAME_OUT, caption_folder, pictures_to_caption
from lora_gui.captioning.wd_tagger import TINY_TAGS, WdTagger, preprocess, write_tiny
from lora_gui.cli import main
from lora_gui.demo import write_demo_dataset
from lora_gui.downloads import DownloadProgress
from lora_gui.errors import ConfigError, DataError, ModelLoadError

HUB_TAGGER = "SmilingWolf/wd-swinv2-tagger-v3"  # what "wd-tagger" downloads
# Scores the controlled tagger gives every picture; the tags not named score 0.01.
SCORES = {
    "general": 0.99,  # a rating: never written
    "1girl": 0.9,
    "simple_background": 0.8,
    "^_^": 0.6,
    "long_hair": 0.5,
    "solo": 0.4,
    "smile": 0.3,  # under the general threshold (0.35)
    "hatsune_miku": 0.9,
    "kirisame_marisa": 0.8,  # under the character threshold (0.85)
}
CAPTION = "hatsune miku, 1girl, simple background, ^_^, long hair, solo"


def controlled_tagger(folder: Path, scores: dict[str, float] = SCORES) -> Path:
    return write_tiny(folder, scores=[scores.get(name, 0.01) for name, _ in TINY_TAGS])


@pytest.fixture
def tagger(tmp_path) -> Path:
    return controlled_tagger(tmp_path / "tagger")


@pytest.fixture
def pictures(tmp_path) -> Path:
    """demo_00 to demo_05, of which 00, 01 and 02 have no caption and 03 an empty one; a picture in a subfolder
    without one; and a file named as a picture that is not one."""
    folder = write_demo_dataset(tmp_path / "pictures", count=6, size=(64, 64))
    for index in (0, 1, 2):
        (folder / f"demo_{index:02d}.txt").unlink()
    (folder / "demo_03.txt").write_text("  \n", encoding="utf-8")
    (folder / "sub").mkdir()
    Image.new("RGB", (80, 48), (30, 160, 40)).save(folder / "sub/green.png")
    (folder / "broken.png").write_bytes(b"not a picture")
    return folder


# ---- the WD tagger -------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_tiny_tagger_loads_through_the_registry_and_tags_each_picture_by_its_look(tmp_path):
    captioner = load_captioner("wd-tagger", source=write_tiny(tmp_path / "random"), threshold=0.2)
    red, blue = Image.new("RGB", (120, 40), (220, 20, 20)), Image.new("RGBA", (30, 90), (0, 0, 255, 255))

    captions = captioner.caption([red, blue, red])

    assert isinstance(captioner, WdTagger) and captioner.size == 64, "the input size is read from the ONNX model"
    assert captions[0] == captions[2] and captions[0] != captions[1], "the scores come from the pixels"
    known = {name.replace("_", " ") if name != "^_^" else name for name, category in TINY_TAGS if category != "9"}
    assert all(tag in known for caption in captions for tag in caption.split(", ") if tag)
    captioner.close()


@pytest.mark.unit
def test_tags_obey_the_thresholds_exclusions_and_ratings_character_tags_first_kaomoji_kept(tagger):
    picture = [Image.new("RGB", (64, 64))]
    assert load_captioner("wd-tagger", source=tagger).caption(picture) == [CAPTION]
    stricter = load_captioner("wd-tagger", source=tagger, threshold=0.55, character_threshold=0.75)
    assert stricter.caption(picture) == ["hatsune miku, kirisame marisa, 1girl, simple background, ^_^"]
    # Excluded tags as a user types them: with spaces or underscores, as a list or one comma-separated text.
    assert load_captioner("wd-tagger", source=tagger, exclude="simple background, long_hair").caption(picture) == [
        "hatsune miku, 1girl, ^_^, solo"
    ]
    assert load_captioner("wd-tagger", source=tagger, exclude=["^_^", "Hatsune_Miku"]).caption(picture) == [
        "1girl, simple background, long hair, solo"
    ]


@pytest.mark.unit
def test_a_picture_is_padded_to_a_square_on_white_resized_to_the_models_size_and_given_in_bgr():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels = preprocess(wide, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.float32
    assert pixels[32, 32].tolist() == [0.0, 0.0, 255.0], "red, in blue-green-red order, 0 to 255"
    assert pixels[0, 32].tolist() == pixels[63, 32].tolist() == [255.0, 255.0, 255.0], "white above and below"
    assert pixels[18:46, 5].tolist() == [[0.0, 0.0, 255.0]] * 28, "centred: the picture fills the width"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("spoil", "options", "error", "message"),
    [
        (
            lambda folder: (folder / "model.onnx").unlink(),
            {},
            ModelLoadError,
            "is not a WD tagger: it has no model.onnx",
        ),
        (
            lambda folder: (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,solo,0,5\n"),
            {},
            ModelLoadError,
            "model.onnx gives 15 scores but selected_tags.csv lists 1 tags; the two files come from different taggers",
        ),
        (lambda folder: (folder / "model.onnx").write_bytes(b"half a model"), {}, ModelLoadError, "damaged"),
        (lambda folder: None, {"threshold": 1.5}, ConfigError, "threshold must be a number above 0 and at most 1"),
        (lambda folder: None, {"temperature": 0.7}, ConfigError, "the WD tagger has no setting temperature"),
    ],
)
def test_a_tagger_that_cannot_be_used_says_why(tagger, spoil, options, error, message):
    spoil(tagger)
    with pytest.raises(error) as raised:
        load_captioner("wd-tagger", source=tagger, **options)
    assert message in str(raised.value)


@pytest.mark.unit
def test_asking_for_the_gpu_where_onnxruntime_has_none_tags_on_the_cpu_and_says_so(tagger, monkeypatch, caplog):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING):
        captioner = load_captioner("wd-tagger", source=tagger, device="cuda")
    assert captioner.runs_on == "the CPU"
    assert "Tagging on the CPU: this onnxruntime has no GPU support (install onnxruntime-gpu" in caplog.text
    assert captioner.caption([Image.new("RGB", (64, 64))]) == [CAPTION]


# ---- from the Hub ----------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_offline_a_tagger_loads_from_the_download_cache_or_says_it_must_be_downloaded_once(tagger, download_cache):
    with pytest.raises(ModelLoadError) as raised:
        load_captioner("wd-tagger")
    assert str(raised.value) == (
        f"WD tagger (SwinV2 v3) must be downloaded once (467 MB from {HUB_TAGGER}), and this computer is offline or "
        "can't reach Hugging Face: connect to the internet and try again (after that it works offline)"
    )
    in_download_cache(download_cache, HUB_TAGGER, tagger)
    assert load_captioner("wd-tagger").caption([Image.new("RGB", (64, 64))]) == [CAPTION]


@pytest.mark.unit
def test_a_hub_tagger_downloads_its_two_files_once_reporting_its_progress(tagger, download_cache, monkeypatch):
    # The repo also holds the same model for other frameworks; only the ONNX one and its tags are fetched.
    hub = serve(monkeypatch, FakeHub(HUB_TAGGER, tagger, download_cache, {"model.safetensors": 400_000}))
    reports: list[DownloadProgress] = []

    captioner = load_captioner("wd-tagger", on_progress=reports.append)

    assert sorted(hub.fetched) == ["model.onnx", "selected_tags.csv"]
    size = hub.bytes_of_the_model()
    assert reports[-1] == DownloadProgress(HUB_TAGGER, size, size, 2, 2)
    for earlier, later in itertools.pairwise(reports):
        assert earlier.done_bytes <= later.done_bytes
    assert captioner.caption([Image.new("RGB", (64, 64))]) == [CAPTION]
    again: list[DownloadProgress] = []
    load_captioner("wd-tagger", on_progress=again.append)
    assert again == [] and len(hub.fetched) == 2, "downloaded once"


# ---- a folder of pictures ----------------------------------------------------------------------------------------
@pytest.mark.unit
def test_only_pictures_without_a_caption_are_captioned_the_prefix_in_front_once(pictures, tagger):
    heard: list[tuple[str, str]] = []
    theirs = {name: (pictures / name).read_text(encoding="utf-8") for name in ("demo_04.txt", "demo_05.txt")}
    written = [f"demo_0{index}.png" for index in range(4)] + ["sub/green.png"]
    assert pictures_to_caption(pictures) == written, "not broken.png: training could not use it"

    result = caption_folder(
        pictures, load_captioner("wd-tagger", source=tagger), prefix="zkx", on_caption=lambda *c: heard.append(c)
    )

    assert result.captioned == written and not result.kept and not result.stopped
    assert heard == [(relpath, f"zkx, {CAPTION}") for relpath in written]
    for relpath in written:
        assert (pictures / relpath).with_suffix(".txt").read_text(encoding="utf-8") == f"zkx, {CAPTION}\n"
    assert {name: (pictures / name).read_text(encoding="utf-8") for name in theirs} == theirs, "theirs left alone"
    assert [str(s) for s in result.skipped] == ["broken.png: not an image file, or a format that can't be read"]
    assert result.summary() == "Captioned 5 pictures; skipped 1."
    assert not (pictures / "broken.txt").exists()

    again = caption_folder(pictures, load_captioner("wd-tagger", source=tagger), overwrite=True, prefix="zkx")
    assert len(again.captioned) == 7
    assert all(
        (pictures / relpath).with_suffix(".txt").read_text(encoding="utf-8") == f"zkx, {CAPTION}\n"
        for relpath in again.captioned
    ), "written again, the prefix still once"
    assert {example.caption for example in data.scan_folder(pictures).examples} == {f"zkx, {CAPTION}"}


@pytest.mark.unit
def test_a_caption_typed_during_the_pass_is_kept(pictures, tagger):
    def user_types_while_it_runs(relpath: str, caption: str) -> None:
        if relpath == "demo_00.png":
            (pictures / "demo_02.txt").write_text("my own words\n", encoding="utf-8")

    result = caption_folder(
        pictures, load_captioner("wd-tagger", source=tagger), batch_size=1, on_caption=user_types_while_it_runs
    )

    assert result.kept == ["demo_02.png"] and "demo_02.png" not in result.captioned
    assert (pictures / "demo_02.txt").read_text(encoding="utf-8") == "my own words\n"
    assert "kept 1 caption edited during captioning" in result.summary()


@pytest.mark.unit
def test_stop_ends_the_pass_between_batches(pictures, tagger):
    (pictures / "broken.png").unlink()
    heard: list[str] = []
    result = caption_folder(
        pictures,
        load_captioner("wd-tagger", source=tagger),
        batch_size=2,
        on_caption=lambda relpath, caption: heard.append(relpath),
        should_stop=lambda: len(heard) >= 2,
    )
    assert result.stopped and result.captioned == heard == ["demo_00.png", "demo_01.png"]
    assert not (pictures / "demo_02.txt").exists()
    assert result.summary() == "Captioned 2 pictures; stopped before the end."


@pytest.mark.unit
def test_a_picture_captioned_in_the_metadata_file_keeps_that_caption(pictures, tagger):
    rows = [{"file_name": "demo_00.png", "text": "from the metadata"}, {"file_name": "demo_01.png", "text": ""}]
    (pictures / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (pictures / "broken.png").unlink()
    captioner = load_captioner("wd-tagger", source=tagger)

    assert "demo_00.png" not in caption_folder(pictures, captioner).captioned
    assert (pictures / "demo_01.txt").is_file(), "an empty metadata caption is filled in by a .txt"
    captions = {example.relpath: example.caption for example in data.scan_folder(pictures).examples}
    assert captions["demo_00.png"] == "from the metadata" and captions["demo_01.png"] == CAPTION

    overwritten = caption_folder(pictures, captioner, overwrite=True)
    assert [(s.name, s.reason) for s in overwritten.skipped] == [("demo_00.png", IN_METADATA)]


@pytest.mark.unit
def test_a_picture_the_captioner_finds_nothing_in_is_skipped_with_the_reason(pictures, tmp_path):
    silent = load_captioner("wd-tagger", source=controlled_tagger(tmp_path / "silent", {}))
    result = caption_folder(pictures, silent)
    assert not result.captioned and (data.Skipped("demo_00.png", NOTHING_CAME_OUT) in result.skipped)
    assert not (pictures / "demo_00.txt").exists()


@pytest.mark.unit
def test_a_folder_that_does_not_exist_says_so(tmp_path, tagger):
    with pytest.raises(DataError, match="does not exist; check the path"):
        caption_folder(tmp_path / "nowhere", load_captioner("wd-tagger", source=tagger))


# ---- the command line --------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_caption_command_writes_txt_files_beside_the_pictures(pictures, tagger, capsys):
    flags = ["--source", str(tagger), "--prefix", "zkx", "--threshold", "0.55", "--exclude", "^_^"]
    code = main(["caption", str(pictures), "--captioner", "wd-tagger", *flags])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (pictures / "demo_00.txt").read_text(encoding="utf-8") == "zkx, hatsune miku, 1girl, simple background\n"
    assert f"Captioning 5 pictures in {pictures} with wd-tagger on the CPU" in err
    assert "Skipped broken.png: not an image file" in err and "Captioned 5 pictures; skipped 1." in err

    assert main(["caption", str(pictures), "--captioner", "wd-tagger", "--source", str(tagger)]) == 0
    assert "needs a caption (--overwrite captions them again)" in capsys.readouterr().err


@pytest.mark.unit
def test_the_caption_command_says_plainly_what_is_wrong(pictures, tagger, tmp_path, capsys):
    assert main(["caption", str(pictures), "--captioner", "blip", "--source", str(tagger)]) == 1
    err = capsys.readouterr().err
    assert "Error: there is no captioner named 'blip'; choose one of:" in err and "wd-tagger" in err
    assert main(["caption", str(tmp_path / "nowhere"), "--captioner", "wd-tagger"]) == 1
    err = capsys.readouterr().err
    assert "Error: the folder" in err and "does not exist" in err and "Traceback" not in err


@pytest.mark.train
def test_train_caption_missing_captions_the_pictures_then_trains(tiny_model, tagger, download_cache, tmp_path, capsys):
    folder = write_demo_dataset(tmp_path / "uncaptioned", count=4, size=(64, 64))
    for caption_file in folder.glob("*.txt"):
        caption_file.unlink()
    in_download_cache(download_cache, HUB_TAGGER, tagger)

    argv = train_argv(
        tiny_model, folder, tmp_path / "run", preset="tiny-cpu-demo", max_steps=2, resolution=64, sample_every=0
    )
    code = main([*argv, "--caption-missing", "wd-tagger"])

    err = capsys.readouterr().err
    assert code == 0, err
    assert f"The captions are written beside the pictures in {folder}" in err and "Done. LoRA:" in err
    assert sorted(path.read_text(encoding="utf-8") for path in folder.glob("*.txt")) == [f"{CAPTION}\n"] * 4
    assert {path.read_text(encoding="utf-8") for path in (tmp_path / "run/dataset").glob("*.txt")} == {f"{CAPTION}\n"}
    assert (tmp_path / "run/pytorch_lora_weights.safetensors").is_file()
