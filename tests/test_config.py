"""TrainConfig: nonsense is refused in words a beginner understands; presets are saved configs."""

from __future__ import annotations

import json

import pytest

from lora_gui.config import TrainConfig, list_presets, load_preset
from lora_gui.errors import ConfigError


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, "rank must be between 1 and 256 (got 0)"),
        ({"rank": 512}, "rank must be between 1 and 256 (got 512)"),
        ({"learning_rate": 0}, "learning_rate must be above 0; 1e-4 is a good start"),
        ({"learning_rate": 0.5}, "learning_rate 0.5 is far too high for LoRA"),
        ({"resolution": 500}, "resolution must be a multiple of 8 (got 500)"),
        ({"resolution": 32}, "resolution must be between 64 and 4096 (got 32)"),
        ({"batch_size": 0}, "batch_size must be between 1 and 1024 (got 0)"),
        ({"max_steps": 0}, "max_steps must be 1 or more (got 0)"),
        ({"caption_dropout": 0.9}, "caption_dropout must be between 0 and 0.5 (got 0.9)"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of auto, no, fp16, bf16 (got 'fp8')"),
        ({"lr_scheduler": "warp"}, "lr_scheduler must be one of"),
        ({"lr_warmup_steps": 10}, "lr_warmup_steps needs a scheduler with warmup"),
        ({"rank": "sixteen"}, "rank must be a whole number (got 'sixteen')"),
        ({"rank": 4.5}, "rank must be a whole number (got 4.5)"),
        ({"random_flip": "maybe"}, "random_flip must be true or false (got 'maybe')"),
    ],
)
def test_nonsense_is_refused_with_a_readable_message(changes, message):
    with pytest.raises(ConfigError) as raised:
        TrainConfig.from_dict(changes)
    assert message in str(raised.value)


@pytest.mark.unit
def test_unknown_settings_in_a_file_are_an_error_not_ignored(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"rank": 8, "lerning_rate": 1e-4}))
    with pytest.raises(ConfigError, match=r"mine.json has unknown setting"):
        TrainConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"mine.json is not valid JSON"):
        TrainConfig.load(path)


@pytest.mark.train
def test_save_and_load_round_trip_with_text_values(tmp_path):
    config = TrainConfig(rank=8, alpha=4, sample_prompts=["a, b", "c"], random_flip=True)
    config.save(tmp_path / "c.json", description="mine")
    assert TrainConfig.load(tmp_path / "c.json") == config
    # Strings from a form or a command line become the field's type.
    assert TrainConfig.from_dict({"rank": "8", "random_flip": "yes", "target_modules": "to_q, to_v"}) == TrainConfig(
        rank=8, random_flip=True, target_modules=["to_q", "to_v"]
    )


@pytest.mark.unit
def test_every_preset_loads_and_describes_itself():
    presets = list_presets()
    assert {"tiny-cpu-demo", "sd15-character", "sd15-style", "sd15-object"} <= set(presets)
    for name, description in presets.items():
        assert description and "\n" not in description, name
        load_preset(name)
    assert load_preset("sd15-character").base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(ConfigError, match="no preset named 'nope'"):
        load_preset("nope")


@pytest.mark.unit
def test_epochs_turn_into_steps():
    assert TrainConfig(max_steps=100).total_steps(batches_per_epoch=7) == 100
    assert TrainConfig(epochs=3, gradient_accumulation_steps=2).total_steps(batches_per_epoch=7) == 11
    assert TrainConfig(epochs=3).total_steps(batches_per_epoch=7, num_processes=2) == 11


@pytest.mark.unit
def test_alpha_zero_means_alpha_equals_rank():
    assert TrainConfig(rank=16).lora_alpha == 16.0
    assert TrainConfig(rank=16, alpha=8).lora_alpha == 8.0


@pytest.mark.train
def test_settings_saved_as_a_preset_load_back_and_never_overwrite(tmp_path, monkeypatch):
    from lora_gui import config as config_module
    from lora_gui.config import save_preset

    monkeypatch.setattr(config_module, "PRESETS_DIR", tmp_path)
    settings = TrainConfig(rank=12, max_steps=345, data="/somewhere/my-photos")
    save_preset("my-settings", settings)
    assert "rank 12, 345 steps" in list_presets()["my-settings"]
    loaded = load_preset("my-settings")
    assert (loaded.rank, loaded.max_steps, loaded.data) == (12, 345, "")  # settings, not that set of images
    with pytest.raises(ConfigError, match="already exists"):
        save_preset("my-settings", settings)
    with pytest.raises(ConfigError, match="can't be a preset name"):
        save_preset("../evil", settings)


@pytest.mark.unit
def test_train_help_shows_every_settings_help_as_written(capsys):
    """argparse formats help texts with %: a setting's "~30% speed" once printed argparse's own internals instead."""
    from lora_gui import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "trains about 30% slower." in shown and "object at 0x" not in shown
