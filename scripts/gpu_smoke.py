"""The first thing to run on a GPU machine: does every CUDA path of the engine work?

For each model and precision: train a few steps with previews along the way, then Generate once
with the LoRA, and check what came out: the run used the GPU in that precision, the losses and the
LoRA are finite, and the pictures (previews and Generate's) are pictures, not one flat colour (NaN
latents decode to black). One line per check, PASS or FAIL with what was measured; exit status 1 if
any failed. `scripts/gpu_bench.sh` runs it before the benchmark rows.

usage: PYTHONPATH=. python scripts/gpu_smoke.py [--workdir DIR] [--models tiny-sd15,tiny-sdxl,...,sd15] [--cpu]

--cpu tries the script itself on a machine without a GPU: the GPU's precisions on the CPU's kernels,
as tests/test_gpu_regime.py runs them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_gui import devices, events
from lora_gui.bench import model_folder
from lora_gui.config import TrainConfig
from lora_gui.demo import write_demo_dataset
from lora_gui.infer import Generator
from lora_gui.quantization import QUANTIZATIONS
from lora_gui.tiny import write_tiny_model
from lora_gui.train import train

# name: (family, resolution, steps, batch size, also train the text encoders with gradient checkpointing,
# the frozen denoiser's quantization)
MODELS = {
    "tiny-sd15": ("sd15", 64, 4, 2, True, "none"),
    "tiny-sd2": ("sd2", 64, 4, 2, True, "none"),
    "tiny-sdxl": ("sdxl", 64, 4, 2, True, "none"),
    "tiny-flux": ("flux", 64, 4, 2, False, "none"),  # Flux LoRAs train the transformer alone
    "tiny-flux-int8": ("flux", 64, 4, 2, False, "int8"),  # the 16 and 24 GB presets' base
    "tiny-flux-nf4": ("flux", 64, 4, 2, False, "nf4"),  # the 12 GB preset's: bitsandbytes on CUDA only
    "sd15": ("sd15", 512, 4, 1, False, "none"),  # the real SD 1.5 architecture, random weights
}
failures: list[str] = []
DEVICE = "cuda"  # where the runs must have run


def check(name: str, body: Callable[[], str]) -> bool:
    """Run one check and print one line: PASS with what it measured, or FAIL with why."""
    started = time.perf_counter()
    try:
        detail = body()
    except Exception as error:
        failures.append(name)
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"FAIL {name}: {type(error).__name__}: {first_line}", flush=True)
        traceback.print_exc(file=sys.stderr)
        return False
    print(f"PASS {name}: {detail} ({time.perf_counter() - started:.1f} s)", flush=True)
    return True


def picture_stats(image: Image.Image) -> str:
    pixels = np.asarray(image, dtype=np.float32)
    if not np.isfinite(pixels).all() or pixels.std() <= 1.0:
        raise AssertionError(f"a flat picture (mean {pixels.mean():.1f}, std {pixels.std():.2f}): NaN or overflow")
    return f"{image.width}x{image.height}, std {pixels.std():.1f}"


def smoke(model: str, precision: str, workdir: Path) -> None:
    family, resolution, steps, batch_size, text_encoder, quantize = MODELS[model]
    if model.startswith("tiny-"):
        folder = workdir / f"smoke-tiny-{family}"
        if not (folder / "model_index.json").is_file():
            write_tiny_model(folder, family)
    else:
        folder = model_folder(workdir, model)  # the benchmark's rows reuse it
    pictures = write_demo_dataset(workdir / f"smoke-images-{resolution}", count=4, size=(resolution, resolution))
    run = workdir / f"smoke-run-{model}-{precision}"
    shutil.rmtree(run, ignore_errors=True)  # a second try in the same workdir starts afresh
    config = TrainConfig(
        base_model=str(folder),
        data=str(pictures),
        resolution=resolution,
        max_steps=steps,
        batch_size=batch_size,
        mixed_precision=precision,
        train_text_encoder=text_encoder,
        gradient_checkpointing=text_encoder or quantize != "none",
        quantize_base=quantize,
        sample_every=steps // 2,
        sample_steps=4,
        checkpoint_every=steps // 2,
        learning_rate=1e-4,
    )
    received: list[events.Event] = []
    label = f"{model} {precision}"

    def training() -> str:
        devices.reset_peak_memory()
        train(config, run, on_event=received.append)
        started = next(e for e in received if e.kind == events.STARTED).data
        if started["device"].split(":")[0] != DEVICE or started["precision"] != precision:
            raise AssertionError(f"ran on {started['device']} in {started['precision']}")
        losses = [e.data["loss"] for e in received if e.kind == events.STEP]
        if len(losses) != steps or not np.isfinite(losses).all():
            raise AssertionError(f"losses {losses}")
        weights = load_file(run / "pytorch_lora_weights.safetensors")
        if not all(torch.isfinite(tensor).all() for tensor in weights.values()):
            raise AssertionError("the LoRA file holds NaN or inf")
        peak = f", peak {devices.peak_gpu_memory_gb():.2f} GB" if DEVICE == "cuda" else ""
        return (
            f"{steps} steps on {started['device']}, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
            f"{len(weights)} finite LoRA tensors{peak}"
        )

    if not check(f"{label} train", training):
        return

    def previews() -> str:
        paths = [path for e in received if e.kind == events.SAMPLES for path in e.data["paths"]]
        if len(paths) < 2:
            raise AssertionError(f"{len(paths)} preview images, expected one mid-run and one at the end")
        return f"{len(paths)} pictures, " + "; ".join(picture_stats(Image.open(path)) for path in paths)

    check(f"{label} previews", previews)

    def generate(card_gb: float | None = None) -> str:
        real_card = devices.gpu_memory_gb
        if card_gb is not None:  # as on a card this small: Generate picks NF4 and moves each part in turn
            devices.gpu_memory_gb = lambda: card_gb
        try:
            generator = Generator.load(str(folder), precision=precision)
        finally:
            devices.gpu_memory_gb = real_card
        denoiser = generator.family.denoiser(generator.pipe)
        dtypes = f"{generator.family.denoiser_title} {denoiser.dtype}, VAE {generator.pipe.vae.dtype}"
        generator.set_loras([(run, 1.0)])
        image = generator("a photo of a red circle", steps=4, width=resolution, height=resolution)
        del generator
        devices.free_memory()
        return f"{dtypes}; {picture_stats(image)}"

    check(f"{label} generate", generate)
    if quantize == "nf4":
        check(f"{label} generate on a small card", lambda: generate(card_gb=0.0001))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench-work")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cpu", action="store_true", help="try the script without a GPU")
    args = parser.parse_args()
    global DEVICE
    if args.cpu:
        DEVICE = "cpu"
        devices.resolve_precision = lambda setting: setting  # what a GPU would run, on the CPU's kernels
    elif not devices.has_cuda():
        print("FAIL setup: no CUDA GPU here (--cpu tries the script on the CPU)", flush=True)
        return 1
    else:
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        print(
            f"{torch.cuda.get_device_name()}, compute capability {capability}, torch {torch.__version__}; "
            f"auto precision here: {devices.resolve_precision('auto')}",
            flush=True,
        )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        if args.cpu and QUANTIZATIONS[MODELS[model][-1]].needs_cuda:
            print(f"SKIP {model}: its quantization runs only on CUDA", flush=True)
            continue
        for precision in ("bf16", "fp16"):
            smoke(model, precision, workdir)
    print(f"{'FAILED: ' + ', '.join(failures) if failures else 'all checks passed'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
