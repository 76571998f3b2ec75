"""The memory estimate (lora_gui/estimate.py) against training the real SD 1.5 architecture on a CPU.

    MALLOC_MMAP_THRESHOLD_=131072 python scripts/memory_check.py [--workdir DIR] [--resolution 512]

Prints a table for BENCHMARKS.md. The fixed mmap threshold makes freed tensors leave the process's
resident memory at once, so its rise during training follows the live tensors; it is sampled every
2 ms, and each measurement runs in a fresh process, so none inherits another's heap. A run needs
about 10 minutes and 12 GB of memory on 2 cores (the model is written once into --workdir, as
`bench` does).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from lora_gui import events
from lora_gui.base_models import load_pipeline
from lora_gui.config import TrainConfig
from lora_gui.demo import write_demo_dataset
from lora_gui.estimate import _preview_bytes, _unet_cost, _vae_encode_bytes
from lora_gui.families.stable_diffusion import StableDiffusion1
from lora_gui.tiny import write_tiny_model
from lora_gui.training import train

GIB = 2**30


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status (Linux only)")


class PeakSampler:
    """The highest resident memory above the level when it started, sampled in a thread."""

    def start(self) -> PeakSampler:
        self.base = self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.running = False
        self.thread.join()

    __enter__ = start

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def rise(self) -> float:
        return (self.peak - self.base) / GIB


def training_rise(model: Path, data: Path, resolution: int, checkpointing: bool, workdir: Path) -> tuple[float, float]:
    """Memory three real training steps add once the weights are loaded and the images encoded, and
    what the preview images made at the end add to where training left off."""
    steps, previews = PeakSampler(), PeakSampler()

    def on_event(event: events.Event) -> None:
        if event.kind == events.STARTED:
            steps.start()
        elif event.kind == events.STEP and event.step == event.total_steps:
            steps.stop()
            previews.start()
        elif event.kind == events.SAMPLES:
            previews.stop()

    config = TrainConfig(
        base_model=str(model),
        data=str(data),
        resolution=resolution,
        rank=16,
        max_steps=3,
        sample_every=0,
        sample_steps=2,  # the peak is the same for any number of denoising steps
        checkpoint_every=0,
        gradient_checkpointing=checkpointing,
        mixed_precision="no",
    )
    train(config, Path(tempfile.mkdtemp(prefix="run-", dir=workdir)), on_event=on_event)
    return steps.rise, previews.rise


def estimated_rise(resolution: int, checkpointing: bool) -> float:
    cost = _unet_cost("sd15", resolution, (16, "lora"), StableDiffusion1.default_target_modules, checkpointing, "no")
    return (cost.activations + cost.lora_params * (4 + 8)) / GIB  # with the LoRA's gradients and Adam state


def vae_encode_rise(model: Path, resolution: int) -> float:
    _, pipe = load_pipeline(str(model), dtype=torch.float32)
    image = torch.randn(1, 3, resolution, resolution)
    with torch.no_grad():
        pipe.vae.encode(image)  # the first call sets up kernels
        with PeakSampler() as sampler:
            pipe.vae.encode(image).latent_dist.sample()
    return sampler.rise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="keeps the written model between runs")
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        print("warning: without MALLOC_MMAP_THRESHOLD_=131072 freed memory may stay resident and inflate the rise")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="memory-check-"))
    model = workdir / "model-sd15"
    if not (model / "model_index.json").is_file():
        write_tiny_model(model, "sd15", size="full")
    data = write_demo_dataset(workdir / f"images-{args.resolution}", count=1, size=(args.resolution,) * 2)
    side = args.resolution
    fresh = multiprocessing.get_context("spawn")
    print(f"| what (SD 1.5, fp32, {side} px, batch 1) | measured on the CPU | estimated |")
    print("|---|---|---|")
    for checkpointing in (False, True):
        with fresh.Pool(1) as pool:
            measured, previews = pool.apply(training_rise, (model, data, side, checkpointing, workdir))
        label = "memory a step adds beyond the weights" + (", gradient checkpointing" if checkpointing else "")
        print(f"| {label} | {measured:.2f} GiB | {estimated_rise(side, checkpointing):.2f} GiB |", flush=True)
    estimated = _preview_bytes(side) / GIB  # calibrated on this measurement
    print(f"| preview images at the end (UNet with guidance, VAE decode) | {previews:.2f} GiB | {estimated:.2f} GiB |")
    for resolution in (side, 2 * side):
        with fresh.Pool(1) as pool:
            measured = pool.apply(vae_encode_rise, (model, resolution))
        estimated = _vae_encode_bytes(resolution) / GIB
        print(f"| VAE encode of one {resolution} px image | {measured:.2f} GiB | {estimated:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
