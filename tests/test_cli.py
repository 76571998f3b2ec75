"""The command line, as a user types it: train, stop, resume, generate, several processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import train_argv
from PIL import Image

from lora_gui.cli import main
from lora_gui.config import load_preset
from lora_gui.demo import write_demo_dataset

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lora_gui", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.alone
def test_the_readme_demo_commands_finish_in_under_two_minutes(tmp_path):
    photos = write_demo_dataset(tmp_path / "photos")
    (photos / "notes.jpg").write_text("not a photo")
    started = time.monotonic()
    made = cli("tiny-model", "tiny", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    trained = cli(*train_argv("tiny", "photos", "run1", preset="tiny-cpu-demo"), cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert trained.returncode == 0, trained.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s"
    assert "Skipped notes.jpg: not an image file" in trained.stderr
    assert "Done. LoRA:" in trained.stderr

    run = tmp_path / "run1"
    for name in (
        "config.json",
        "metrics.jsonl",
        "train.log",
        "pytorch_lora_weights.safetensors",
        "dataset",
        "samples",
        "checkpoints",
    ):
        assert (run / name).exists(), name
    assert (
        len((run / "metrics.jsonl").read_text().splitlines())
        == json.loads((run / "config.json").read_text())["max_steps"]
    )


def test_flags_override_the_preset(tiny_model, photos, tmp_path):
    code = main(
        train_argv(
            tiny_model,
            photos,
            tmp_path / "run",
            preset="tiny-cpu-demo",
            rank=4,
            max_steps=3,
            resolution=64,
            aspect_buckets=False,
            sample_every=0,
            sample_prompts=["a red circle", "a blue square"],
        )
    )
    assert code == 0
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert (saved["rank"], saved["max_steps"], saved["resolution"], saved["aspect_buckets"]) == (4, 3, 64, False)
    assert saved["learning_rate"] == load_preset("tiny-cpu-demo").learning_rate, "unset flags keep the preset's value"
    assert saved["sample_prompts"] == ["a red circle", "a blue square"]


def test_bad_input_prints_a_plain_error_and_no_traceback(tiny_model, tmp_path, capsys):
    assert main(train_argv(tmp_path / "missing", tmp_path, tmp_path / "run", max_steps=2)) == 1
    err = capsys.readouterr().err
    assert "Error:" in err and "Traceback" not in err
    assert main(train_argv(tiny_model, tmp_path / "none", tmp_path / "run2", rank=0)) == 1
    assert "rank must be between 1 and 256" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("base_model", "message"),
    [
        ("./no/such/folder", "not found: there is no such folder or file on this computer"),
        (
            "someone/not-downloaded",
            "offline mode is on (HF_HUB_OFFLINE) and it is not in this computer's download cache",
        ),
        (".", "is a folder but not a diffusers model (it has no model_index.json)"),
        ("model.ckpt", "is a pickled checkpoint, which can run code when loaded"),
        ("weird.safetensors", "is not a checkpoint of a model this trainer knows"),
    ],
)
def test_a_model_that_cannot_be_loaded_says_what_was_tried(tmp_path, monkeypatch, base_model, message):
    from safetensors.torch import save_file

    from lora_gui.base_models import load_pipeline
    from lora_gui.errors import ModelLoadError

    monkeypatch.chdir(tmp_path)
    Path("model.ckpt").write_bytes(b"pickle")
    import torch

    save_file({"some.tensor": torch.zeros(2)}, "weird.safetensors")
    with pytest.raises(ModelLoadError) as raised:
        load_pipeline(base_model)
    assert message in str(raised.value)


def test_interrupt_stops_cleanly_and_resume_finishes(tiny_model, photos, tmp_path):
    args = train_argv(
        tiny_model,
        photos,
        tmp_path / "run",
        resolution=64,
        max_steps=20,  # SIGINT comes at step 3; the resume trains the rest
        checkpoint_every=1000,
        sample_every=0,
        learning_rate="1e-3",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "lora_gui", *args], env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Stopped at step" in err and "Continue with --resume" in err
    stopped_at = len(metrics.read_text().splitlines())
    assert stopped_at < 20
    assert (tmp_path / f"run/checkpoints/step-{stopped_at}").is_dir()
    assert (tmp_path / "run/pytorch_lora_weights.safetensors").is_file()

    resumed = cli(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 21))


def test_generate_with_a_lora_at_strength_zero_and_one(tiny_model, photos, tmp_path):
    args = train_argv(
        tiny_model, photos, tmp_path / "run", resolution=64, max_steps=10, sample_every=0, learning_rate="1e-3"
    )
    assert main(args) == 0
    common = [
        "generate",
        "--base-model",
        str(tiny_model),
        "--prompt",
        "a photo of a red circle",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "5",
    ]
    assert main([*common, "--output", str(tmp_path / "base.png")]) == 0
    assert main([*common, "--lora", str(tmp_path / "run"), "--scale", "0", "--output", str(tmp_path / "zero.png")]) == 0
    assert (
        main(
            [
                *common,
                "--lora",
                str(tmp_path / "run/pytorch_lora_weights.safetensors"),
                "--output",
                str(tmp_path / "one.png"),
            ]
        )
        == 0
    )
    base, zero, one = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("base", "zero", "one"))
    assert base.shape == (64, 64, 3)
    assert np.abs(zero - base).max() <= 1
    assert np.abs(one - base).max() > 3


def test_generate_refuses_pickled_loras_unless_allowed(tiny_model, tmp_path, capsys):
    (tmp_path / "lora.ckpt").write_bytes(b"pickle")
    code = main(
        [
            "generate",
            "--base-model",
            str(tiny_model),
            "--lora",
            str(tmp_path / "lora.ckpt"),
            "--prompt",
            "x",
            "--output",
            str(tmp_path / "x.png"),
            "--steps",
            "1",
        ]
    )
    assert code == 1
    assert "pickled file, which can run any code" in capsys.readouterr().err


def test_two_processes_with_accelerate_launch(tiny_model, photos, tmp_path):
    # `--cpu --num_processes 2` runs one process unless MPI is installed; torchrun's launcher (--multi_gpu)
    # starts two, which on a machine without CUDA form a gloo group on the CPU.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "lora_gui",
            *train_argv(
                tiny_model, photos, tmp_path / "run", resolution=64, max_steps=4, checkpoint_every=2, sample_every=0
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run/train.log").read_text()
    assert "2 process(es)" in log
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4], "one metrics line per step, written by one process"
    # Each step takes one batch per process: 2 processes x batch 1 = 2 images a step, 6 images = 3 steps an epoch.
    assert rows[-1]["epoch"] == pytest.approx(4 / 3, abs=0.01)
    assert (tmp_path / "run/checkpoints/step-4/random_states_1.pkl").is_file(), "each process saved its RNG"
    assert (tmp_path / "run/pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("gated", "the model is gated: accept its licence on https://huggingface.co/someone/some-model"),
        ("missing", "no such model on the Hub (or it is private)"),
        ("unreachable", "the Hugging Face Hub could not be reached and it is not in this computer's download cache"),
        (["model.safetensors", "README.md"], "not a diffusers pipeline (it has no model_index.json). It holds model"),
    ],
)
def test_hub_failures_are_told_apart(monkeypatch, answer, message):
    import huggingface_hub
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from lora_gui import downloads
    from lora_gui.base_models import load_pipeline
    from lora_gui.errors import ModelLoadError

    def list_repo_files(self, repo_id):
        response = type("Response", (), {"headers": {}, "status_code": 404, "request": None, "url": ""})()
        if answer == "gated":
            raise GatedRepoError("gated", response=response)
        if answer == "missing":
            raise RepositoryNotFoundError("missing", response=response)
        if answer == "unreachable":
            raise ConnectionError("no network")
        return answer

    def no_download(*args, **kwargs):
        raise OSError("download failed")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(downloads, "hf_hub_download", no_download)  # the download ahead of loading fails too
    monkeypatch.setattr(DiffusionPipeline, "load_config", no_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    with pytest.raises(ModelLoadError) as raised:
        load_pipeline("someone/some-model")
    assert message in str(raised.value)


def test_generating_out_of_gpu_memory_is_a_plain_message(tiny_model, monkeypatch):
    from diffusers import UNet2DConditionModel

    from lora_gui.errors import OutOfMemoryError
    from lora_gui.infer import Generator

    generator = Generator.load(str(tiny_model))

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(UNet2DConditionModel, "forward", no_memory)
    with pytest.raises(OutOfMemoryError, match=r"ran out of memory while making the picture.*training run"):
        generator("a red circle", steps=1, width=64, height=64)
