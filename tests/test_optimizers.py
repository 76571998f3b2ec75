"""The optimizers beside AdamW: each trains a LoRA that loads, resumes exactly, is estimated at its size, and the
form's learning rate follows the one picked."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.runs import quick_config
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gui import events
from lora_gui.config import TrainConfig
from lora_gui.errors import ConfigError
from lora_gui.estimate import estimate
from lora_gui.optimizers import OPTIMIZERS, settings_for_optimizer
from lora_gui.training import train
from lora_gui.training.messages import oom_advice

# Each with the schedule it is used with; a warmup where it takes one (Prodigy's safeguard, schedule-free's own).
SETTINGS = {
    "prodigy": {"learning_rate": 1.0, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "prodigy_d_coef": 2.0},
    # Previews at step 4: schedule-free evaluates at its averaged weights there, and must train on unchanged.
    "adamw-schedulefree": {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2, "sample_every": 4},
    "adafactor": {"lr_scheduler": "cosine"},
}


@pytest.mark.train
@pytest.mark.parametrize("optimizer", list(SETTINGS))
def test_each_optimizer_trains_a_lora_that_loads_and_resumes_exactly(tiny_model, photos, tmp_path, optimizer):
    config = quick_config(
        tiny_model,
        photos,
        optimizer=optimizer,
        max_steps=5,
        checkpoint_every=2,
        train_text_encoder=optimizer == "prodigy",  # two parameter groups, which Prodigy gives one rate
        **SETTINGS[optimizer],
    )
    train(config, tmp_path / "straight")
    rows = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 6)) and all(math.isfinite(row["loss"]) for row in rows)
    pipe = DiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(tmp_path / "straight")
    lora = load_file(tmp_path / "straight/pytorch_lora_weights.safetensors")
    assert any(key.startswith("text_encoder") for key in lora) == config.train_text_encoder
    assert any(tensor.abs().max() > 0 for key, tensor in lora.items() if "lora_B" in key), "it learned nothing"
    with safe_open(str(tmp_path / "straight/straight.safetensors"), framework="pt") as kohya:
        assert kohya.metadata()["ss_optimizer"].split(".")[0] in ("prodigyopt", "schedulefree", "transformers")

    seen: list = []
    train(
        config,
        tmp_path / "interrupted",
        on_event=seen.append,
        should_stop=lambda: any(e.kind == events.STEP and e.step >= 3 for e in seen),
    )
    assert seen[-1].kind == events.STOPPED and seen[-1].step == 3
    train(config, tmp_path / "interrupted", resume=True)
    resumed = load_file(tmp_path / "interrupted/pytorch_lora_weights.safetensors")
    assert resumed.keys() == lora.keys()
    for key in lora:
        torch.testing.assert_close(resumed[key], lora[key], rtol=0, atol=0, msg=key)

    if optimizer == "adamw-schedulefree":
        # The LoRA files hold the averaged weights; checkpoints the ones it trains at, exactly, for the resume.
        checkpoint = load_file(tmp_path / "straight/checkpoints/step-5/pytorch_lora_weights.safetensors")
        assert any(not torch.equal(checkpoint[key], lora[key]) for key in lora)


@pytest.mark.unit
def test_the_estimate_orders_the_optimizers_by_the_state_they_keep():
    def training_gb(optimizer: str) -> float:
        config = TrainConfig(optimizer=optimizer, rank=128, **settings_for_optimizer(optimizer, 1e-4, 0, "constant", 0))
        return estimate(config, "sd15", "bf16").training_gb

    memory = {optimizer: training_gb(optimizer) for optimizer in OPTIMIZERS}
    assert memory["adafactor"] < memory["adamw8bit"] < memory["adamw"] < memory["prodigy"], memory
    assert memory["adamw-schedulefree"] == memory["adamw"], memory


@pytest.mark.unit
def test_each_optimizer_is_one_registry_entry_whose_kohya_name_is_its_class_and_the_app_reads_it_without_torch():
    import subprocess
    import sys

    for name, optimizer in OPTIMIZERS.items():
        try:
            kind = optimizer.load()
        except ConfigError:  # bitsandbytes, for NVIDIA GPUs, may not be installed
            continue
        assert f"{kind.__module__}.{kind.__qualname__}" == optimizer.kohya_class, name
    assert TrainConfig.help("optimizer").startswith("adamw (the usual); adamw8bit (less memory; NVIDIA GPUs);")
    imports = "import sys, lora_gui.optimizers; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.unit
def test_out_of_memory_advice_names_a_smaller_optimizer():
    assert "adafactor optimizer or 8-bit AdamW" in oom_advice(TrainConfig(optimizer="prodigy", learning_rate=1.0))
    assert "adafactor optimizer;" in oom_advice(TrainConfig(optimizer="adamw8bit"))
    assert "adafactor" not in oom_advice(TrainConfig(optimizer="adafactor"))


@pytest.mark.unit
def test_picking_an_optimizer_fits_the_forms_learning_rate_and_schedule_to_it():
    # AdamW's rate is no Prodigy rate, and back: each gets its own usual one.
    assert settings_for_optimizer("prodigy", 1e-4, 0.0, "constant", 0) == {"learning_rate": 1.0}
    assert settings_for_optimizer("adamw", 1.0, 0.0, "constant", 0) == {"learning_rate": 1e-4}
    # A rate of the user's that fits is kept; an empty box gets the usual one.
    assert settings_for_optimizer("adafactor", 5e-5, 0.0, "cosine", 0) == {}
    assert settings_for_optimizer("prodigy", 0.5, 0.0, "cosine", 0) == {}
    assert settings_for_optimizer("adamw", None, 0.0, "constant", 0) == {"learning_rate": 1e-4}
    # Prodigy finds one step size for everything: the text encoder's rate becomes "the same".
    assert settings_for_optimizer("prodigy", 1e-4, 5e-5, "constant", 0) == {
        "learning_rate": 1.0,
        "text_encoder_learning_rate": 0.0,
    }
    # Schedule-free AdamW needs no decay; a warmup stays.
    assert settings_for_optimizer("adamw-schedulefree", 1e-4, 0.0, "cosine", 0) == {"lr_scheduler": "constant"}
    assert settings_for_optimizer("adamw-schedulefree", 1e-4, 0.0, "linear", 10) == {
        "lr_scheduler": "constant_with_warmup"
    }
    # Whatever the form held, the settings it leads to are valid.
    for optimizer in OPTIMIZERS:
        for rate, scheduler, warmup in ((1e-4, "cosine", 10), (1.0, "constant", 0), (3e-3, "polynomial", 0)):
            form = {"learning_rate": rate, "text_encoder_learning_rate": 2e-4, "lr_scheduler": scheduler}
            form["lr_warmup_steps"] = warmup
            TrainConfig(optimizer=optimizer, **{**form, **settings_for_optimizer(optimizer, **form)})


@pytest.mark.unit
def test_settings_an_optimizer_cannot_follow_are_refused_plainly():
    with pytest.raises(ConfigError, match="is an AdamW learning rate: Prodigy finds its own step size"):
        TrainConfig(optimizer="prodigy", learning_rate=1e-4)
    with pytest.raises(ConfigError, match=r"only the prodigy optimizer takes 1\.0"):
        TrainConfig(optimizer="adamw", learning_rate=1.0)
    with pytest.raises(ConfigError, match="Prodigy takes one learning rate for everything it trains"):
        TrainConfig(optimizer="prodigy", learning_rate=1.0, text_encoder_learning_rate=0.5)
    with pytest.raises(ConfigError, match=r"lr_scheduler cosine lowers the learning rate .* Pick constant"):
        TrainConfig(optimizer="adamw-schedulefree", lr_scheduler="cosine")


@pytest.mark.unit
def test_a_prodigy_run_resumes_from_the_train_tab_with_its_own_rate(tmp_path):
    """The form's rates on Resume are checked as the run's optimizer takes them, not as AdamW's."""
    from types import SimpleNamespace

    from lora_gui.owners import EVERYONE
    from lora_gui.runs import RunFolder
    from lora_gui.ui import train_tab

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    TrainConfig(optimizer="prodigy", learning_rate=1.0).save(run.config)
    asked = {}
    jobs = SimpleNamespace(
        get=lambda job_id: SimpleNamespace(owner="", run=run),
        resume=lambda path, hub_token, changes: asked.update(changes) or SimpleNamespace(job_id=2),
    )
    ctx = SimpleNamespace(
        engine=SimpleNamespace(jobs=jobs),
        folders=SimpleNamespace(check_room_for_a_run=lambda visitor: None),
        models=SimpleNamespace(hub_token=lambda token, visitor: None),
    )
    form = {name: 0.5 if name == "learning_rate" else getattr(TrainConfig(), name)
            for name in train_tab.RESUMED_FROM_THE_FORM}  # fmt: skip
    answer = train_tab.resume(ctx, EVERYONE, 1, None, **form)
    assert answer["train_job"] == 2 and asked["learning_rate"] == 0.5, answer


@pytest.mark.unit
def test_picking_prodigy_in_the_train_tab_fills_in_its_rate_and_hint_and_redoes_the_estimate():
    from types import SimpleNamespace

    from lora_gui.ui import config_form, train_tab
    from lora_gui.ui.model_choices import TINY_CHOICE

    ctx = SimpleNamespace(models=SimpleNamespace(family=lambda model: "sd15"), engine=SimpleNamespace(has_cuda=False))
    form = {**config_form.widget_values(TrainConfig()), "optimizer": "prodigy"}
    answer = train_tab.pick_optimizer(ctx, TINY_CHOICE, **form)
    assert answer["learning_rate"]["value"] == 1.0 and "leave it at 1.0" in answer["learning_rate"]["info"]
    assert "The demo and tiny models need almost no memory" in answer["estimate"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--optimizer", "prodigy"], {"learning_rate": 1.0}),
        (["--optimizer", "prodigy", "--learning-rate", "0.5"], {"learning_rate": 0.5}),
        (["--optimizer", "adamw-schedulefree", "--lr-scheduler", "cosine"], None),
        (["--optimizer", "adamw-schedulefree"], {"learning_rate": 1e-4, "lr_scheduler": "constant"}),
    ],
)
def test_the_command_line_fits_the_learning_rate_to_the_optimizer_unless_told(
    monkeypatch, tmp_path, capsys, flags, expected
):
    from lora_gui import cli, training

    trained = []
    monkeypatch.setattr(training, "train", lambda config, *args, **kwargs: trained.append(config))
    where = ["--base-model", "someone/model", "--data", str(tmp_path), "--output", str(tmp_path / "run")]
    code = cli.main(["train", *where, *flags])
    if expected is None:
        assert code == 1 and "lowers the learning rate over the run" in capsys.readouterr().err
        return
    assert code == 0
    assert {name: getattr(trained[0], name) for name in expected} == expected
