"""Suggested settings: from planted picture sets (only their headers are read) and simulated cards, checked with
the memory estimate; the command line's --auto and the Train tab's button drive the same engine."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from lora_gui import cli, devices, memory_savers, training
from lora_gui.config import TrainConfig
from lora_gui.data import scan_folder
from lora_gui.errors import LoraGuiError
from lora_gui.estimate import estimate
from lora_gui.families import REGISTRY
from lora_gui.families.flux import Flux1
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE
from lora_gui.staging import Staging
from lora_gui.suggest import ASSUMED_CARD, HEADROOM, Card, Pictures, suggest
from lora_gui.ui import config_form
from lora_gui.ui.app import build_app
from lora_gui.ui.train_tab import show_estimate, suggest_settings

GB = 2**30
CARDS = {"8 GB": Card(8 * GB, bf16=True), "24 GB": Card(24 * GB, bf16=True), "no GPU": ASSUMED_CARD}
# What a suggestion must always decide, each with its reason.
DECIDED = (
    "max_steps",
    "rank",
    "learning_rate",
    "resolution",
    "batch_size",
    "caption_dropout",
    "gradient_checkpointing",
    "optimizer",
    "quantize_base",
)


def plant(folder: Path, count: int, size: tuple[int, int], caption: str) -> Path:
    """`count` pictures of `size` with captions: flat JPEGs, a few hundred bytes each, since only headers are read."""
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", size, (index % 256, 90, 160)).save(folder / f"{index:03d}.jpg", quality=50)
        (folder / f"{index:03d}.txt").write_text(f"{caption}, picture {index}\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def picture_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    return {
        "small": plant(root / "small", 5, (1024, 1344), "a photo of a woman"),
        "large": plant(root / "large", 200, (1152, 1024), "a photo of a woman"),
    }


def pictures_of(folder: Path) -> Pictures:
    return Pictures.of(scan_folder(folder).examples)


@pytest.mark.unit
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("card", list(CARDS))
def test_every_suggestion_fits_the_card_by_the_estimate_and_says_why(picture_sets, family, card):
    steps = {}
    for size, folder in picture_sets.items():
        suggestion = suggest(pictures_of(folder), "person", family, CARDS[card])
        config = suggestion.config
        precision = "bf16" if CARDS[card].bf16 else "fp16"
        assert estimate(config, family, precision).memory_gb <= CARDS[card].memory_gb * HEADROOM
        reasons = {change.setting: change.reason for change in suggestion.changes}
        assert set(DECIDED) <= set(reasons), f"no reason given for {set(DECIDED) - set(reasons)}"
        assert all(len(reason) > 10 for reason in reasons.values())
        for change in suggestion.changes:
            assert getattr(config, change.setting) == change.value
        steps[size] = config.max_steps * config.batch_size
        assert config.validation_images == (2 if size == "large" else 0)
    assert steps["small"] < steps["large"], "a larger set is looked at longer"


@pytest.mark.unit
def test_an_8_gb_card_gets_memory_savers_that_a_24_gb_card_does_without(picture_sets):
    pictures = pictures_of(picture_sets["small"])
    small = suggest(pictures, "person", "sdxl", CARDS["8 GB"]).config
    big = suggest(pictures, "person", "sdxl", CARDS["24 GB"])
    assert small.gradient_checkpointing and small.quantize_base != "none"
    assert not big.config.gradient_checkpointing and big.config.quantize_base == "none"
    assert big.config.resolution == small.resolution == 1024, "quantizing comes before a lower resolution"
    fitted = {c.setting: c.reason for c in suggest(pictures, "person", "sdxl", CARDS["8 GB"]).changes}
    assert fitted["gradient_checkpointing"].startswith("to fit in memory")
    assert fitted["quantize_base"].startswith("to fit in memory")
    assert "Sized for this 24 GB GPU." in big.notes[0]


@pytest.mark.unit
def test_flux_on_a_24_gb_card_gets_its_8_bit_tier(picture_sets):
    """What the flux-dev-24gb preset holds, found from the estimate alone."""
    suggestion = suggest(pictures_of(picture_sets["small"]), "person", "flux", CARDS["24 GB"])
    config = suggestion.config
    assert (config.quantize_base, config.resolution, config.gradient_checkpointing) == ("int8", 1024, True)
    assert suggestion.estimate.memory_gb <= 24 * HEADROOM


@pytest.mark.unit
def test_what_the_pictures_show_and_their_sizes_decide_rank_dropout_and_resolution():
    small_pictures = Pictures((400, 420, 380, 500, 700), ("a photo of sks dog",) * 5)
    person = suggest(small_pictures, "person", "sd15", CARDS["24 GB"]).config
    assert person.resolution == 384, "not above most pictures' short side"
    assert person.rank == 32 and not person.random_flip
    assert person.trigger_word == "", "'photo' is in every caption already"
    rich = ("a watercolor of a harbour at dusk with boats, gulls, wet cobbles and warm lamps in the windows",) * 40
    style = suggest(Pictures((768,) * 40, rich), "style", "sd15", CARDS["24 GB"])
    assert style.config.rank == 8 and style.config.caption_dropout == 0.1 and style.config.random_flip
    assert "describe each picture" in {c.setting: c.reason for c in style.changes}["rank"]
    bare = suggest(Pictures((768,) * 6, ("a cat",) * 3 + ("a dog",) * 3), "object", "sd15", CARDS["24 GB"]).config
    assert bare.trigger_word == "ohwx" and bare.rank == 16


@pytest.mark.unit
def test_settings_kept_stay_and_the_savers_work_around_them(picture_sets):
    pictures = pictures_of(picture_sets["small"])
    base = TrainConfig(rank=32, quantize_base="none")
    three_gb = Card(3 * GB, bf16=True)
    suggestion = suggest(pictures, "person", "sd15", three_gb, base, keep={"rank", "quantize_base"})
    assert suggestion.config.quantize_base == "none" and suggestion.kept == ["rank", "quantize_base"]
    assert suggestion.config.resolution < 512, "without quantizing, a lower resolution makes it fit"
    assert suggestion.estimate.memory_gb <= 3 * HEADROOM
    reasons = {change.setting: change.reason for change in suggestion.changes}
    assert reasons["resolution"] == "to fit in memory (≈ 3.4 GB without the memory savers): less detail"


@pytest.mark.unit
def test_nothing_that_does_not_fit_is_suggested():
    with pytest.raises(LoraGuiError, match=r"even with every memory saver.*more than this 1 GB card"):
        # With the resolution and checkpointing the user's, the savers left need no new measurement: quick.
        keep = {"resolution", "gradient_checkpointing"}
        suggest(Pictures((512,) * 5, ("a cat",) * 5), "object", "sd15", Card(1 * GB, bf16=True), keep=keep)


@pytest.mark.unit
def test_without_a_gpu_the_settings_are_for_the_processor_and_said(monkeypatch):
    monkeypatch.setattr(devices, "card", lambda: None)
    here = Card.here()
    assert here.processor and not here.bf16 and here.memory_bytes > 0
    assert "No GPU here: these settings are for this computer's processor" in here.describe()
    assert "No GPU here: these settings assume a 24 GB card" in ASSUMED_CARD.describe()
    monkeypatch.setattr(devices, "card", lambda: devices.Card(12.0, bf16=False))
    assert Card.here() == Card(12 * GB, bf16=False)


@pytest.mark.unit
def test_train_auto_applies_the_suggestion_but_keeps_the_flags_given(picture_sets, monkeypatch, tmp_path, capsys):
    trained = []
    monkeypatch.setattr(devices, "card", lambda: None)
    monkeypatch.setattr(training, "train", lambda config, *args, **kwargs: trained.append(config))
    folder = picture_sets["large"]
    auto = ["train", "--auto", "--subject", "style", "--data", str(folder), "--family", "sd15", "--rank", "4"]
    code = cli.main([*auto, "--base-model", "someone/model", "--output", str(tmp_path / "run")])
    assert code == 0
    (config,) = trained
    assert config.rank == 4, "an explicit flag wins"
    assert config.caption_dropout == 0.1 and config.validation_images == 2 and config.resolution == 512
    printed = capsys.readouterr().err
    assert "No GPU here" in printed
    assert "--caption-dropout 0.1: a style should come through without its words" in printed
    assert "Kept as given: --rank" in printed


@pytest.mark.train
def test_the_train_tab_fills_the_form_from_the_visitors_staged_pictures(picture_sets, tmp_path):
    _, ctx = build_app(tmp_path, JobManager())
    settings = {**config_form.widget_values(TrainConfig()), "family": "sd15"}
    staging = Staging.for_session(ctx.runs_dir, "", EVERYONE)
    empty = suggest_settings(ctx, EVERYONE, staging.session_id, "someone/model", "person", **settings)
    assert "no usable pictures yet" in html.unescape(empty["suggestions"])

    staging.import_folder(picture_sets["small"])
    filled = suggest_settings(ctx, EVERYONE, staging.session_id, "someone/model", "object", **settings)
    shown = html.unescape(filled["suggestions"])
    assert "<li><b>Rank</b>: 16. One object needs less room than a face.</li>" in shown
    assert filled["rank"] == 16 and filled["max_steps"] == 800 and filled["resolution"] == 512
    assert set(config_form.field_names()) <= set(filled)
    unknown = {**settings, "family": "auto"}
    assert "'Model family'" in html.unescape(
        suggest_settings(ctx, EVERYONE, staging.session_id, "someone/model", "object", **unknown)["suggestions"]
    )


class ManyBlocks(Flux1):
    """Flux.1 with 8 of its 57 blocks (one double-stream, seven single-stream): a transformer whose blocks swap, quick
    to measure."""

    name = "many-blocks"
    denoiser_shapes: ClassVar[dict[str, dict[str, Any]]] = {
        **Flux1.denoiser_shapes,
        "full": dict(num_layers=1, num_single_layers=7, guidance_embeds=True),
    }


@pytest.fixture
def many_blocks(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(REGISTRY, ManyBlocks.name, ManyBlocks)
    return ManyBlocks.name


@pytest.mark.unit
def test_block_swap_is_suggested_only_when_nothing_cheaper_fits_with_the_fewest_blocks_that_do(many_blocks):
    pictures = Pictures((520,) * 5, ("a photo of a woman",) * 5)  # 512 px: no lower resolution is tried
    roomy = suggest(pictures, "person", many_blocks, Card(8 * GB, bf16=True))
    assert roomy.config.blocks_to_swap == 0 and roomy.config.quantize_base == "none"
    card = Card(int(2.45 * GB), bf16=True)
    suggestion = suggest(pictures, "person", many_blocks, card)
    config = suggestion.config
    # Everything cheaper first: 4 bits, 8-bit AdamW, checkpointing (which block swap needs anyway).
    assert (config.quantize_base, config.optimizer, config.gradient_checkpointing) == ("nf4", "adamw8bit", True)
    budget = card.memory_gb * HEADROOM  # where T5 (9.1 GB) encodes with its layers streamed
    fits = [estimate(config.replace(blocks_to_swap=n), many_blocks, "bf16", card_gb=budget).memory_gb for n in range(9)]
    fewest = next(count for count, memory in enumerate(fits) if memory <= budget)
    assert 1 < config.blocks_to_swap == fewest < 8, fits
    reasons = {change.setting: change.reason for change in suggestion.changes}
    assert (
        f"{fewest} of the 8 blocks wait in the computer's memory and stream to the GPU each step"
        in (reasons["blocks_to_swap"])
    )
    assert "slower on an RTX 3090" in reasons["blocks_to_swap"]
    assert "block swap needs it" in reasons["gradient_checkpointing"]
    # The out-of-memory advice names block swap once nothing cheaper is left, in settings' names and the form's labels,
    # and never for a family whose blocks don't swap.
    label = config_form.label("blocks_to_swap")
    assert not any("blocks_to_swap" in tip for tip in memory_savers.tips(TrainConfig(), many_blocks))
    assert any("blocks_to_swap" in tip for tip in memory_savers.tips(config, many_blocks))
    assert any(label in tip for tip in memory_savers.form_tips(config, memory_savers.TRAINING, many_blocks))
    assert not any(label in tip for tip in memory_savers.form_tips(config, memory_savers.TRAINING, "sdxl"))


@pytest.mark.unit
def test_the_train_tab_says_what_block_swap_costs_in_speed(many_blocks, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(devices, "card", lambda: devices.Card(24.0, bf16=True))
    settings = config_form.widget_values(TrainConfig(resolution=512, gradient_checkpointing=True, blocks_to_swap=6))
    shown = {}
    for tflops in (1000.0, 5.0):  # a fast card waits for the copies, a slow one hides them behind its work
        engine = SimpleNamespace(has_cuda=True, gpu_tflops=lambda tflops=tflops: tflops)
        ctx = SimpleNamespace(engine=engine, models=SimpleNamespace(family=lambda model: many_blocks))
        shown[tflops] = html.unescape(show_estimate(ctx, base_model="someone/many-blocks", **settings)["estimate"])
    assert "Block swap: 6 of the 8 blocks wait in the computer's memory" in shown[5.0]
    assert "stream to the GPU each step, hardly slower." in shown[5.0]
    assert re.search(r"stream to the GPU each step, about \d+% slower\.", shown[1000.0]), shown[1000.0]
