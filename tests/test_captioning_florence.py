"""Florence-2 captions, offline: a tiny random-weight Florence-2 written here in transformers' layout and loaded by
the code that loads florence-community/Florence-2-base, through the captioner registry as the app and the CLI do."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from transformers import Florence2Processor

from lora_gui import devices, downloads
from lora_gui.captioning import captioner_infos, florence, load_captioner
from lora_gui.captioning.florence import Florence2, write_tiny
from lora_gui.errors import ConfigError, LoraGuiError, ModelLoadError

pytestmark = pytest.mark.unit

# A random model never says when it is done: a short limit keeps its captions quick on a CPU.
QUICK = {"max_tokens": 16}
MARKUP = ("<s>", "</s>", "<pad>", "<image>", "<loc_", "<cap>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED")


@pytest.fixture(scope="module")
def tiny_florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("florence") / "tiny")


def pictures() -> list[Image.Image]:
    """Three unlike pictures, one of them greyscale (the captioner converts it) and none square."""
    gradient = Image.linear_gradient("L")
    colourful = Image.merge("RGB", [gradient, Image.radial_gradient("L"), gradient.rotate(90)]).resize((72, 56))
    return [Image.new("RGB", (80, 60), "red"), Image.new("L", (50, 70), 200), colourful]


def test_tiny_florence_is_a_small_florence2_in_transformers_layout(tiny_florence: Path):
    size = sum(path.stat().st_size for path in tiny_florence.iterdir())
    assert size < 3e6
    config = json.loads((tiny_florence / "config.json").read_text())
    assert config["model_type"] == "florence2" and "auto_map" not in config
    assert {"model.safetensors", "tokenizer.json", "processor_config.json"} <= {p.name for p in tiny_florence.iterdir()}


def test_both_florence2_sizes_are_offered_with_their_download_size():
    infos = {info.name: info for info in captioner_infos()}
    assert infos["florence2-base"].repo_id == "florence-community/Florence-2-base"
    assert infos["florence2-large"].repo_id == "florence-community/Florence-2-large"
    assert 0 < infos["florence2-base"].download_mb < infos["florence2-large"].download_mb


def test_captions_each_picture_with_words_only_and_the_same_twice(tiny_florence: Path):
    captioner = load_captioner("florence2-base", source=tiny_florence, **QUICK)
    assert captioner.runs_on == "the CPU"
    captions = captioner.caption(pictures())
    assert len(captions) == 3
    assert all(isinstance(caption, str) and caption.strip() for caption in captions)
    assert not [caption for caption in captions if any(token in caption for token in MARKUP)]
    assert all(caption == " ".join(caption.split()) for caption in captions)  # no doubled or trailing spaces
    assert len(set(captions)) > 1  # the picture reaches the caption
    assert captioner.caption(pictures()) == captions
    assert captioner.caption([]) == []


def test_the_answer_is_cleaned_of_florences_markup(tiny_florence: Path):
    captioner = Florence2.load(Florence2.infos[0], source=tiny_florence, **QUICK)
    tokenizer = captioner.processor.tokenizer
    # What the real model answers, wrapped as it wraps it, with a location token and padding of a shorter answer.
    answer = "</s><s>A red<loc_3> car on  the sky</s><pad><pad>"
    ids = torch.tensor([tokenizer.encode(answer, add_special_tokens=False)])
    with mock.patch.object(captioner.model, "generate", return_value=ids):
        assert captioner.caption([Image.new("RGB", (64, 64))]) == ["A red car on the sky"]


@pytest.mark.parametrize(
    ("options", "prompt"),
    [
        ({}, "<DETAILED_CAPTION>"),
        ({"detail": "short"}, "<CAPTION>"),
        ({"detail": "detailed"}, "<DETAILED_CAPTION>"),
        ({"detail": "more"}, "<MORE_DETAILED_CAPTION>"),
    ],
)
def test_detail_asks_for_its_task_in_one_batch(tiny_florence: Path, options: dict, prompt: str):
    captioner = load_captioner("florence2-base", source=tiny_florence, **options, max_tokens=2)  # the prompt matters
    with mock.patch.object(
        Florence2Processor, "__call__", autospec=True, side_effect=Florence2Processor.__call__
    ) as processor_call:
        captioner.caption(pictures())
    assert processor_call.call_count == 1  # the three pictures go through the model together
    assert processor_call.call_args.kwargs["text"] == [prompt] * 3


def test_close_lets_the_model_go(tiny_florence: Path):
    captioner = load_captioner("florence2-base", source=tiny_florence, **QUICK)
    model = weakref.ref(captioner.model)
    captioner.close()
    gc.collect()
    assert model() is None
    with pytest.raises(LoraGuiError, match="closed"):
        captioner.caption(pictures())


def test_gpu_precision_runs(tiny_florence: Path, monkeypatch):
    """The GPU's half precision, run on the CPU: the pixels must reach the model in its dtype."""
    monkeypatch.setattr(florence, "_dtype_for", lambda device: torch.bfloat16)
    captioner = load_captioner("florence2-base", source=tiny_florence, **QUICK)
    assert captioner.model.dtype == torch.bfloat16
    assert all(caption.strip() for caption in captioner.caption(pictures()))


def test_precision_follows_the_device(monkeypatch):
    assert florence._dtype_for("cpu") == torch.float32
    for computes_bf16, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        gpu = devices.Card(12, computes_bf16, torch.device("cuda"))
        monkeypatch.setattr(devices, "card", lambda gpu=gpu: gpu)
        assert florence._dtype_for("cuda") == dtype
        assert florence._dtype_for("cuda:0") == dtype
        assert florence._dtype_for("cpu") == torch.float32, "moved to the CPU while a run trains: fp32 there"
    monkeypatch.setattr(devices, "card", lambda: None)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        florence._dtype_for("cuda")


def test_downloads_its_hub_repo_or_the_one_given(tiny_florence: Path, monkeypatch):
    asked = []

    def download_files(repo_id, allow_patterns, token=None, on_progress=None):
        asked.append((repo_id, token, on_progress))
        assert "*.safetensors" in allow_patterns and not any("bin" in pattern for pattern in allow_patterns)
        return tiny_florence

    monkeypatch.setattr(downloads, "download_files", download_files)
    report = print
    load_captioner("florence2-large", token="hf_x", on_progress=report, **QUICK)
    load_captioner("florence2-base", source="someone/Florence-2-base-finetuned", **QUICK)
    assert asked == [
        ("florence-community/Florence-2-large", "hf_x", report),
        ("someone/Florence-2-base-finetuned", None, None),
    ]


def test_offline_with_nothing_downloaded_says_to_connect_once(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match="florence-community/Florence-2-base") as error:
        load_captioner("florence2-base")
    assert "must be downloaded once" in str(error.value) and "connect to the internet" in str(error.value)


def test_folders_that_are_not_a_native_florence2_are_refused_plainly(tiny_florence: Path, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_captioner("florence2-base", source=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a Florence-2 model"):
        load_captioner("florence2-base", source=tmp_path / "empty")
    remote_code = shutil.copytree(tiny_florence, tmp_path / "remote-code")
    config = json.loads((remote_code / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}
    (remote_code / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"remote-code layout.*florence-community/Florence-2-base"):
        load_captioner("florence2-base", source=remote_code)
    damaged = shutil.copytree(tiny_florence, tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match="damaged or incomplete"):
        load_captioner("florence2-base", source=damaged)


def test_unknown_settings_are_refused_by_name(tiny_florence: Path):
    with pytest.raises(ConfigError, match="detail must be one of short, detailed, more"):
        load_captioner("florence2-base", source=tiny_florence, detail="long")
    with pytest.raises(ConfigError, match="no setting threshold"):
        load_captioner("florence2-base", source=tiny_florence, threshold=0.5)
    with pytest.raises(ConfigError, match="max_tokens must be a whole number"):
        load_captioner("florence2-base", source=tiny_florence, max_tokens=0)
