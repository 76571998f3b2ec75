"""What a CUDA GPU does differently, run on the CPU: its dtypes, its device moves, several processes,
its memory, and the ways it fails.

On a GPU the engine loads the UNet and text encoders in bf16 or fp16 beside an fp32 VAE and runs
them under autocast; every other test runs in fp32. Every family on every card, in the card's dtypes on
the CPU's own bf16 and fp16 kernels, is tests/test_cards.py's card matrix. What the CPU can't reproduce:
accelerate keeps fp16 gradient scaling (GradScaler) to CUDA, so fp16 runs here without it; the LoRA
weights are fp32 either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from helpers.app import generate_request
from helpers.paths import ROOT
from helpers.runs import quick_config
from safetensors.torch import load_file

from lora_gui import bench, devices
from lora_gui.errors import LoraGuiError, OutOfMemoryError
from lora_gui.infer import Generator
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE
from lora_gui.training import train


@pytest.mark.train
@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet-only", "with-text-encoder"])
def test_each_phase_has_only_its_own_modules_on_the_device(
    tiny_models, photos, tmp_path, monkeypatch, train_text_encoder
):
    """The VAE encodes the pictures, then the text encoders the captions and preview prompts, each without the
    others or the UNet beside them; the UNet trains without them; previews bring the VAE back alone. Each module
    is where the engine says."""
    offloads = []

    class Recorded(devices.Offload):
        def __init__(self, device):
            super().__init__(device)
            offloads.append(self)

    phases = []

    def on_forward(module, args):
        name = type(module).__name__
        if name in ("Encoder", "Decoder", "UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection"):
            (offload,) = offloads
            on_device = {type(m).__name__ for m in offload.on_device}
            phases.append((name, torch.is_grad_enabled(), frozenset(on_device)))
            for part in offload.on_device:
                assert all(p.device.type == offload.device.type for p in part.parameters())
            for tensor in (a for a in args if isinstance(a, torch.Tensor)):
                assert tensor.device.type == offload.device.type, f"{name} got a tensor on {tensor.device}"

    monkeypatch.setattr(devices, "Offload", Recorded)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    try:
        config = quick_config(tiny_models("sdxl"), photos, max_steps=1, train_text_encoder=train_text_encoder)
        train(config, tmp_path / "run")
    finally:
        hook.remove()

    vae, unet = "AutoencoderKL", "UNet2DConditionModel"
    encoders = {"CLIPTextModel", "CLIPTextModelWithProjection"}
    trained = {unet, *(encoders if train_text_encoder else ())}
    first_step = next(i for i, (_, grad, _) in enumerate(phases) if grad)
    caching, after = phases[:first_step], phases[first_step:]
    assert {name for name, _, _ in caching} == {"Encoder", *(() if train_text_encoder else encoders)}
    # The VAE and the text encoders take turns: Flux's T5 alone fills most of a 12 GB card.
    assert all(on_device == {vae} for name, _, on_device in caching if name == "Encoder"), caching
    assert all(on_device == encoders for name, _, on_device in caching if name in encoders), caching
    steps = [(name, on_device) for name, grad, on_device in after if grad]
    assert {name for name, _ in steps} == trained
    assert all(on_device == trained for _, on_device in steps), steps
    previews = [(name, on_device) for name, grad, on_device in after if not grad]
    # Frozen encoders encoded the preview prompts while caching; trained ones encode them for each set.
    encoding = {on_device for name, on_device in previews if name in encoders}
    assert encoding == ({frozenset({unet, *encoders})} if train_text_encoder else set())
    assert {on_device for name, on_device in previews if name == unet} == {frozenset(trained)}
    assert {on_device for name, on_device in previews if name == "Decoder"} == {frozenset({*trained, vae})}


@pytest.mark.train
def test_two_processes_training_the_text_encoder_agree_and_stop_together(tiny_model, photos, tmp_path):
    """Under `accelerate launch --multi_gpu` (gloo on the CPU), with gradient checkpointing: the text
    encoders' LoRA gradients are averaged across processes like the UNet's, so both end with the same
    LoRA; and a stop that only one process hears stops both at the same step instead of hanging."""
    settings = tmp_path / "config.json"
    config = quick_config(tiny_model, photos, max_steps=8, batch_size=1, checkpoint_every=2, train_text_encoder=True)
    config.replace(gradient_checkpointing=True).save(settings)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = ROOT / "tests" / "helpers" / "two_ranks.py"
    command += [str(script), str(settings), str(tmp_path / "run"), "--stop-after", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3], "both processes stopped after step 3"
    first, second = (load_file(tmp_path / f"run/rank-{rank}.safetensors") for rank in (0, 1))
    text_keys = [key for key in first if key.startswith("text_encoder.")]
    assert text_keys and first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first), "the two processes' LoRAs differ"
    assert (tmp_path / "run/checkpoints/step-3").is_dir()


@pytest.mark.train
def test_text_encoder_checkpointing_recomputes_its_layers(tiny_model, photos, tmp_path):
    """With gradient checkpointing, each text-encoder layer runs again in the backward pass instead of
    keeping its activations: its attention runs twice per step, not once."""

    def attention_calls(checkpointing: bool) -> int:
        calls = []

        def count(module, args):
            if type(module).__name__ == "CLIPAttention" and torch.is_grad_enabled():
                calls.append(1)

        hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
        try:
            config = quick_config(
                tiny_model, photos, max_steps=1, train_text_encoder=True, gradient_checkpointing=checkpointing
            )
            train(config, tmp_path / f"run-{checkpointing}")
        finally:
            hook.remove()
        return len(calls)

    plain = attention_calls(False)
    assert plain > 0
    assert attention_calls(True) == 2 * plain


@pytest.mark.unit
@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")],
    ids=["V100", "T4-RTX20xx", "A100", "RTX30xx", "H100"],
)
def test_auto_precision_is_bf16_only_where_the_card_computes_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # emulation counts here
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=16 * 2**30))
    assert devices.resolve_precision("auto") == expected
    assert devices.resolve_precision("fp16") == "fp16" and devices.resolve_precision("no") == "no"
    assert devices.resolve_precision("bf16") == "bf16", "an explicit choice is kept (with a warning where slow)"


@pytest.mark.unit
def test_without_a_gpu_everything_runs_in_full_precision(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_precision("auto") == "no"
    assert devices.resolve_precision("bf16") == "no"
    assert "No CUDA GPU: running in full precision" in caplog.text


@pytest.mark.train
def test_fp32_matmuls_use_tensor_cores_on_a_gpu(monkeypatch, tiny_model, photos, tmp_path):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    devices.use_tensor_cores()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    monkeypatch.undo()

    calls = []
    monkeypatch.setattr(devices, "use_tensor_cores", lambda: calls.append(1))
    train(quick_config(tiny_model, photos, max_steps=1), tmp_path / "run")
    Generator.load(str(tiny_model))
    assert len(calls) == 2, "training and Generate both turn TF32 on"


CUDA_OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: out of memory"),
]


@pytest.mark.train
@pytest.mark.parametrize("error", CUDA_OUT_OF_MEMORY, ids=lambda error: str(error)[:40])
def test_every_form_of_running_out_of_gpu_memory_gets_the_advice(tiny_model, photos, tmp_path, monkeypatch, error):
    def no_memory(*args, **kwargs):
        raise error

    generator = Generator.load(str(tiny_model))
    monkeypatch.setattr(UNet2DConditionModel, "forward", no_memory)
    with pytest.raises(OutOfMemoryError, match=r"the GPU ran out of memory\. To fit: "):
        train(quick_config(tiny_model, photos, max_steps=1), tmp_path / "run")
    with pytest.raises(OutOfMemoryError, match="ran out of memory while making the picture"):
        generator("a red circle", steps=1, width=64, height=64)


@pytest.mark.train
def test_other_runtime_errors_are_not_taken_for_memory(tiny_model, photos, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(UNet2DConditionModel, "forward", broken)
    with pytest.raises(LoraGuiError, match="unexpected error: RuntimeError: CUDA error: an illegal memory access"):
        train(quick_config(tiny_model, photos, max_steps=1), tmp_path / "run")


@pytest.mark.unit
def test_bench_peak_memory_is_what_the_card_must_hold(monkeypatch):
    """PyTorch's reserved peak (not only what its tensors took) plus the CUDA context and libraries."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 20 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *args: 24 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *args: 22 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (140 * gib - 23 * gib, 140 * gib))
    assert bench._peak_memory_gb() == pytest.approx(24 + 1)


# ---- the Generate tab and training share the GPU ----------------------------------------------------
@pytest.fixture
def app(tmp_path):
    from lora_gui.ui.app import build_app

    jobs = JobManager()
    _, ctx = build_app(tmp_path / "runs", jobs)
    yield ctx
    jobs.close()


@pytest.mark.train
def test_a_starting_run_unloads_the_generate_model_and_says_so(app, tiny_model, photos, tmp_path):
    with app.engine.generators.use(str(tiny_model)) as generator:
        assert generator.pipe is not None
        # A run submitted while a picture is being made waits for it before it loads anything.
        job = app.engine.jobs.submit(quick_config(tiny_model, photos, max_steps=1), tmp_path / "run")
        time.sleep(1.0)
        assert app.engine.generators.model == str(tiny_model)
        assert not any("Checking images" in line for line in job.snapshot().log)
    state = app.engine.jobs.wait(job.job_id, timeout=300)
    assert state.status == "finished", state.error
    assert app.engine.generators.model is None
    assert any("The model the Generate tab had loaded was unloaded" in line for line in state.log)


@pytest.mark.train
def test_generate_waits_while_a_run_trains_on_the_gpu(tiny_model, tmp_path, monkeypatch):
    from lora_gui.ui.app import build_app
    from lora_gui.ui.generate import generate

    monkeypatch.setattr(devices, "card", lambda: devices.Card(memory_gb=24, bf16=True, device=torch.device("cpu")))
    _, app = build_app(tmp_path / "runs", JobManager())
    with app.engine.jobs.gpu.run_turn(tell=lambda text: None, should_stop=lambda: False):  # as a training run holds it
        refused = generate(app, EVERYONE, **generate_request(tiny_model, tiny_model / "never-read.safetensors"))[
            "gen_notice"
        ]
    # The run may be another visitor's: it is not named.
    assert "A run is training on the GPU and needs its memory: Generate works again once it ends" in refused
    assert app.engine.generators.model is None, "nothing was loaded beside the run"

    # On a CPU (the tiny demo) there is no GPU to share: Generate goes ahead beside the run.
    monkeypatch.setattr(devices, "card", lambda: None)
    with (
        app.engine.jobs.gpu.run_turn(tell=lambda text: None, should_stop=lambda: False),
        app.engine.generators.use(str(tiny_model)),
    ):
        assert app.engine.generators.model == str(tiny_model)


@pytest.mark.train
def test_an_unexpected_failure_in_generate_is_a_message_not_a_crash(app, tiny_model, photos, tmp_path, monkeypatch):
    from lora_gui.ui.generate import generate

    def broken(*args, **kwargs):
        raise RuntimeError("Input type (c10::BFloat16) and bias type (float) should be the same")

    train(quick_config(tiny_model, photos, max_steps=1), tmp_path / "run")
    monkeypatch.setattr(AutoencoderKL, "decode", broken)
    result = generate(
        app, EVERYONE, **generate_request(tiny_model, tmp_path / "run" / "pytorch_lora_weights.safetensors")
    )
    assert "Making the pictures failed on an unexpected error: RuntimeError: Input type" in result["gen_notice"]
