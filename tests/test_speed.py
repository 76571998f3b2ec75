"""The benchmark command and the pre-training estimate: they run and say what they promise.

(Speed itself is measured by `python -m lora_gui bench` and recorded in BENCHMARKS.md, not asserted.)"""

from __future__ import annotations

import re

import pytest

from lora_gui.cli import main
from lora_gui.config import TrainConfig
from lora_gui.estimate import estimate


@pytest.mark.train
def test_bench_prints_both_loops_and_the_machine_readable_last_line(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--images",
                "4",
                "--workdir",
                str(tmp_path),
                "--json",
                str(tmp_path / "result.json"),
                "--repeat",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("| reference ") for line in out) and any(line.startswith("| ours ") for line in out)
    last = re.fullmatch(r"ours/reference steps/s: (\d+\.\d\d); peak memory ours/reference: \d+\.\d\d", out[-1])
    assert last
    # Both pairs ran; the one reported is one of them.
    ratios = next(line for line in out if "every pair's ratio" in line).split(": ")[-1].split(", ")
    assert len(ratios) == 2 and last.group(1) in ratios
    assert (tmp_path / "result.json").is_file()


@pytest.mark.train
@pytest.mark.parametrize("model", ["flux-tiny", "zimage-tiny"])
def test_bench_times_a_flow_script_step_against_ours_on_a_tiny_model(tmp_path, capsys, model):
    """The rectified-flow references (train_dreambooth_lora_flux.py's and _z_image.py's step) run the family's
    transformer, not a UNet."""
    argv = ["bench", "--model", model, "--resolution", "64", "--batch-size", "1", "--steps", "1"]
    assert main([*argv, "--warmup", "1", "--images", "2", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"model {model} at 64 px, batch 1")
    assert any(line.startswith("| reference ") for line in out) and any(line.startswith("| ours ") for line in out)
    assert out[-1].startswith("ours/reference steps/s: ")


@pytest.mark.unit
def test_bench_refuses_counts_it_cannot_time(tmp_path, capsys):
    assert main(["bench", "--steps", "0", "--workdir", str(tmp_path)]) == 1
    assert "--steps must be 1 or more (got 0)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing was written or run"


@pytest.mark.unit
def test_estimate_grows_with_batch_and_shrinks_with_checkpointing():
    base = TrainConfig(resolution=512, rank=16, max_steps=1000)
    one = estimate(base, "sd15", "bf16", matmul_tflops=100)
    eight = estimate(base.replace(batch_size=8), "sd15", "bf16", matmul_tflops=100)
    light = estimate(base.replace(gradient_checkpointing=True), "sd15", "bf16", matmul_tflops=100)
    assert 2 < one.memory_gb < 8 and eight.memory_gb > one.memory_gb + 4
    assert eight.training_gb > one.training_gb + 5 and light.training_gb < one.training_gb
    # The UNet's LoRA step at 512 px counts ~1.7 TFLOP per image (forward and backward).
    assert one.step_tflop == pytest.approx(1.72, abs=0.05)
    assert eight.seconds > 7 * one.seconds
    assert "GB of GPU memory" in one.summary() and "min" in eight.summary()


@pytest.mark.unit
def test_each_image_adds_its_activations_not_the_weights_backward_reuses():
    """Frozen layers keep their own weights for backward: that is the model's memory, counted once.
    Training SD 1.5 at 512 px on a CPU in fp32 kept 1.6 GiB beyond the weights, so about 0.8 in bf16."""
    two = TrainConfig(resolution=512, rank=16, batch_size=2)
    one = two.replace(batch_size=1)
    per_image = estimate(two, "sd15", "bf16").training_gb - estimate(one, "sd15", "bf16").training_gb
    assert 0.6 < per_image < 1.0


@pytest.mark.unit
def test_the_estimate_is_the_largest_phase_and_previews_count():
    """Previews bring the VAE and text encoders back beside the UNet: with checkpointing they are the peak."""
    light = estimate(TrainConfig(resolution=512, rank=16, gradient_checkpointing=True), "sd15", "bf16")
    assert light.memory_gb == max(light.caching_gb, light.training_gb, light.previews_gb)
    assert light.previews_gb > light.training_gb > light.caching_gb


@pytest.mark.unit
def test_low_vram_presets_fit_their_cards_by_the_estimate():
    from lora_gui.config import load_preset

    assert estimate(load_preset("sd15-low-vram"), "sd15", "fp16").memory_gb < 6
    assert estimate(load_preset("sdxl-low-vram"), "sdxl", "fp16").memory_gb < 12


@pytest.mark.train
def test_an_estimate_leaves_a_run_training_beside_it_alone(tmp_path, monkeypatch):
    """The app estimates while a run trains in another thread: real attention and torch's default dtype
    must stay as they are for that run, whatever the estimate does to count memory."""
    import threading

    import torch
    import torch.nn.functional as F

    from lora_gui import estimate as estimate_module

    monkeypatch.setenv(estimate_module.CACHE_DIR_ENV, str(tmp_path))  # counted here, not read from an earlier count
    estimate_module._measured_cost.cache_clear()
    config = TrainConfig(resolution=256, rank=4, max_steps=10)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (estimate(config, "sd15", "bf16"), done.set()))
    query = torch.randn(1, 2, 8, 4, requires_grad=True)
    worker.start()
    calls = 0
    while not done.is_set() or calls == 0:
        assert torch.get_default_dtype() == torch.float32
        output = F.scaled_dot_product_attention(query, query, query)
        output.sum().backward()  # the memory-counting stand-in has no backward
        calls += 1
    worker.join()
    expected = torch.softmax(query @ query.transpose(-1, -2) / 2, dim=-1) @ query
    torch.testing.assert_close(output, expected)


@pytest.mark.unit
def test_a_count_is_kept_on_disk_for_the_next_process_and_made_anew_when_the_code_changes(tmp_path, monkeypatch):
    """Counting a published model takes 10-20 s: the next process (a restarted app) reads the count, unless the code or
    packages that count it changed."""
    from lora_gui import estimate as estimate_module

    def counting_again(*args):
        raise AssertionError("counted again")

    monkeypatch.setenv(estimate_module.CACHE_DIR_ENV, str(tmp_path))
    arguments = ("sd15", "full", 64, (4, "lora"), ("to_q",), False, "no")
    estimate_module._measured_cost.cache_clear()
    first = estimate_module._measured_cost(*arguments)
    assert len(list((tmp_path / "estimate").glob("_measured_cost-*.json"))) == 1
    estimate_module._measured_cost.cache_clear()  # as in a new process
    monkeypatch.setattr(estimate_module, "_meta_unet", counting_again)
    assert estimate_module._measured_cost(*arguments) == first
    estimate_module._measured_cost.cache_clear()
    monkeypatch.setattr(estimate_module, "_code_fingerprint", lambda: "another version")
    with pytest.raises(AssertionError, match="counted again"):
        estimate_module._measured_cost(*arguments)
    estimate_module._measured_cost.cache_clear()
