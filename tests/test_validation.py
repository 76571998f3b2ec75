"""The validation loss: pictures held out of training, measured at fixed noise and timesteps, its best step kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.runs import quick_config
from safetensors import safe_open

from lora_gui import batching, data, events
from lora_gui.demo import write_demo_dataset
from lora_gui.runs import FINISHED, RunFolder, ValidationCurve, summarize
from lora_gui.training import train, validation

VALIDATED = dict(validation_images=2, validation_every=2, max_steps=8)


def val_rows(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["val_loss"]) for row in RunFolder(run_dir).read_metrics() if "val_loss" in row]


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("eight") / "photos", count=8, size=(96, 96))


@pytest.fixture(scope="module")
def straight(tiny_model: Path, eight: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """An uninterrupted validated run, its folder and events; the batch order it trained with is spied on."""
    seen: list = []
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    orders: list[batching.BatchOrder] = []
    spy = pytest.MonkeyPatch()
    spy.setattr(batching.BatchOrder, "__init__", _recording(batching.BatchOrder.__init__, orders))
    try:
        train(quick_config(tiny_model, eight, **VALIDATED), run_dir, on_event=seen.append)
    finally:
        spy.undo()
    return run_dir, seen, orders[0]


def _recording(init, orders: list):
    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        orders.append(self)

    return record


@pytest.mark.train
def test_two_identical_runs_give_identical_validation_curves(straight, tiny_model, eight, tmp_path):
    run_dir, _, _ = straight
    train(quick_config(tiny_model, eight, **VALIDATED), tmp_path / "again")
    curve = val_rows(run_dir)
    assert [step for step, _ in curve] == [2, 4, 6, 8], "every validation_every steps, and at the end"
    assert val_rows(tmp_path / "again") == curve
    assert len({loss for _, loss in curve}) > 1, "the curve moves as the LoRA learns"


@pytest.mark.train
def test_held_out_pictures_are_never_in_a_batch(straight):
    run_dir, seen, order = straight
    run = RunFolder(run_dir)
    names = [example.relpath for example in data.scan_folder(run.dataset).examples]
    held_out = run.held_out()
    assert len(held_out) == 2 and set(held_out) <= set(names), "they stay in dataset/"
    assert sorted(names[index] for index in order.held_out) == sorted(held_out)
    trained = {index for position in range(8 * 2) for index in order(position)}
    assert trained == set(range(8)) - order.held_out
    started = next(event for event in seen if event.kind == events.STARTED)
    assert started.data["images"] == 6 and all(name in started.data["validation"] for name in held_out)


@pytest.mark.unit
def test_held_out_pictures_depend_only_on_the_seed_and_the_names():
    examples = [data.Example(Path(f"{name}.png"), "x", (64, 64), f"{name}.png") for name in "abcdefghij"]
    chosen, _ = batching.hold_out(examples, 2, seed=7)
    shuffled = examples[::-1]
    again, _ = batching.hold_out(shuffled, 2, seed=7)
    assert {examples[i].relpath for i in chosen} == {shuffled[i].relpath for i in again}
    capped, note = batching.hold_out(examples, 5, seed=7)
    assert len(capped) == 2 and "at most a quarter" in note


@pytest.mark.train
def test_a_small_set_says_why_it_has_no_validation(tiny_model, photos, tmp_path):
    seen: list = []
    train(quick_config(tiny_model, photos, **VALIDATED), tmp_path / "run", on_event=seen.append)
    started = next(event for event in seen if event.kind == events.STARTED)
    assert started.data["images"] == 6
    assert "too few to hold any out" in started.data["validation"] and "8 or more" in started.data["validation"]
    assert val_rows(tmp_path / "run") == [] and not RunFolder(tmp_path / "run").best_lora.exists()


@pytest.mark.train
def test_the_best_steps_lora_is_kept_and_names_its_step(straight):
    run_dir, seen, _ = straight
    run = RunFolder(run_dir)
    best_step, best_loss = ValidationCurve.of(val_rows(run_dir)).best
    with safe_open(str(run.best_lora), framework="pt") as handle:
        metadata = handle.metadata()
        assert any(key.startswith("lora_unet_") for key in handle.keys())  # noqa: SIM118 (not iterable)
    assert metadata["lora_gui.best_step"] == metadata["ss_steps"] == str(best_step)
    assert float(metadata["lora_gui.validation_loss"]) == best_loss
    assert metadata["ss_num_train_images"] == "6", "the held-out pictures are not counted as trained on"
    finished = seen[-1]
    assert finished.kind == events.FINISHED and str(run.best_lora) in finished.data["files"]
    assert f"at step {best_step}" in finished.data["message"]


@pytest.mark.train
def test_early_stop_ends_the_run_as_a_finished_one(tiny_model, eight, tmp_path, monkeypatch):
    measured = iter([1.0, 0.5, 0.7, 0.6, 0.4])  # steps 2, 4, 6, 8, 10: no better than step 4's at 6 and 8
    monkeypatch.setattr(validation, "_validation_loss", lambda t: next(measured))
    seen: list = []
    config = quick_config(tiny_model, eight, **{**VALIDATED, "max_steps": 20, "early_stop": 2})
    train(config, tmp_path / "run", on_event=seen.append)
    finished = seen[-1]
    assert finished.kind == events.FINISHED and (finished.step, finished.total_steps) == (8, 20)
    assert "Stopped early at step 8 of 20" in finished.data["message"] and "at step 4" in finished.data["message"]
    run = RunFolder(tmp_path / "run")
    assert [row["step"] for row in run.read_metrics()][-1] == 8 and run.latest_checkpoint()[0] == 8
    assert run.kohya_lora.is_file() and json.loads(run.lora_info.read_text())["steps"] == 8
    assert summarize(run.path).status == FINISHED, "the command line's run folder reads as finished, not stopped"
    with safe_open(str(run.best_lora), framework="pt") as handle:
        assert handle.metadata()["lora_gui.best_step"] == "4"


@pytest.mark.train
def test_a_stopped_and_resumed_run_continues_the_same_curve(straight, tiny_model, eight, tmp_path):
    config = quick_config(tiny_model, eight, **VALIDATED)
    seen: list = []
    stop = lambda: any(e.kind == events.STEP and e.step >= 5 for e in seen)  # noqa: E731
    train(config, tmp_path / "run", on_event=seen.append, should_stop=stop)
    assert seen[-1].kind == events.STOPPED and val_rows(tmp_path / "run") == val_rows(straight[0])[:2]
    train(config, tmp_path / "run", resume=True)
    assert val_rows(tmp_path / "run") == val_rows(straight[0])
    with safe_open(str(RunFolder(tmp_path / "run").best_lora), framework="pt") as handle:
        step = handle.metadata()["lora_gui.best_step"]
    assert step == str(ValidationCurve.of(val_rows(straight[0])).best[0])


@pytest.mark.train
def test_a_folder_of_validation_pictures_is_copied_into_the_run_and_measured(tiny_model, photos, tmp_path):
    others = write_demo_dataset(tmp_path / "others", count=2, size=(96, 96))
    config = quick_config(tiny_model, photos, validation_data=str(others), validation_every=4, max_steps=4)
    train(config, tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    assert sorted(p.name for p in run.validation_pictures.glob("*.png")) == ["demo_00.png", "demo_01.png"]
    assert run.held_out() == [] and len(val_rows(run.path)) == 1
