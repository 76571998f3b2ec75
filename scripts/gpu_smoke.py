"""The first thing to run on a GPU machine: does every CUDA path of the engine work, on the cards people have?

Two kinds of rows, run most important first (the order is under "Time on an H100"), one line per check: PASS or
FAIL with what was measured or why (exit status 1 if any failed), SKIP for a part its time did not allow:

- model rows (`--models`): for each model and precision, train a few steps with previews along the way, then
  Generate once with the LoRA, and check what came out: the run used the GPU in that precision, the losses and
  the LoRA are finite, and the pictures (previews and Generate's) are pictures, not one flat colour (NaN latents
  decode to black). The tiny Flux with an int8 or NF4 base (tiny-flux-int8, tiny-flux-nf4) only when named: the
  card rows train those bases.
- card rows (`--cards 12,16,24`, on by default): the one large GPU made into smaller cards. For each size, as a
  card that computes bf16 and as one that computes fp16 only (an RTX 20xx, a T4), the process's memory is capped
  to that size (torch.cuda.set_per_process_memory_fraction) and the engine sees that card (`devices.card` returns
  it: its choices of precision, quantization and offloading follow). Then, with Flux (`--card-models`: the tiny
  one, then the shallow full-width one as time allows):
    train  2 steps with the settings of the card's preset (flux-dev-12gb: NF4 base and 8-bit AdamW;
           flux-dev-16gb: int8 base and 8-bit AdamW; flux-dev-24gb: int8 base, rank 32) at 64 px, mixed
           precision "auto": the card's precision, finite losses and LoRA, peak memory within the cap;
    previews  the pictures made at steps 1 and 2;
    generate  Generate with quantize="auto" and precision "auto", the LoRA on: the quantization it chose, where
           each part of the model was (all on the GPU, or waiting in CPU memory to be brought in turn), the
           picture, peak memory within the cap. These models are small, so Generate is told (by replacing
           `lora_gui.infer`'s measures of a model's size, `denoiser_parameters_on_disk` and `_weight_bytes`) that
           the model is Flux.1-dev's size, part by part: its choices are those it makes for Flux.1-dev on that
           card, and they must be physically sound (the denoiser fits the card whole, and what does not all fit
           is offloaded).

- block-swap rows (`--swap-models`: the shallow Z-Image, full width, 4 of its 34 blocks; with --cpu the tiny one):
  train 3 steps at 512 px in bf16 with gradient checkpointing, first keeping every block on the GPU, then with
  blocks_to_swap 2 (block_swap.py: 2 blocks streamed from pinned CPU memory through the ring of 2 slots); each
  line gives the seconds a step took after the first and the peak memory, and the swap row the losses' largest
  difference from the first (0 where the GPU's kernels are deterministic). It fails where the losses are not
  finite, or block swap does not lower the peak.

Time on an H100 (estimates, conservative: no GPU has run this yet; the script measures and prints each check's
time), in the order they run:
    start (imports, CUDA, the first kernels)                      25 s
    tiny-sd15, tiny-sd2, tiny-sdxl, tiny-flux, tiny-flux2-klein,
    tiny-chroma:                                                  6 x 2 x 10 s
    tiny-zimage-int8 (the Z-Image presets' int8 base): bf16, fp16  2 x 10 s
    tiny-qwen-image: bf16, fp16                                   2 x 10 s
    card rows, tiny Flux: 12, 16, 24 GB x bf16, fp16             6 x 12 s
    block swap, shallow Z-Image: with and without               40 s to write its 3.3 GB once, 2 x 25 s
    card rows, shallow Flux, 12 and 16 GB x fp16, then bf16      40 s to write its 2.4 GB once, 4 x 35 s
    sd15 (the real SD 1.5 architecture): bf16 and fp16           20 s to write it, 2 x 35 s
    card rows, shallow Flux, 24 GB x fp16, bf16                  2 x 35 s
That is 25 + 160 + 72 = 257 s before block swap and the shallow Flux, over the budget: the last card rows, block
swap, the shallow Flux's rows and sd15 run as far as the budget allows: a part starts only if its estimate fits in
what is left of `--budget` (230 s from the process's start, inside scripts/gpu_bench.sh's `timeout 240`); one that
doesn't prints `SKIP <name>: ...`, which is not a failure.

usage: PYTHONPATH=. python scripts/gpu_smoke.py [--workdir DIR] [--models tiny-sd15,...,sd15] [--cards 12,16,24]
       [--card-models tiny-flux,flux-shallow] [--card-precisions bf16,fp16] [--swap-models zimage-shallow]
       [--budget SECONDS] [--cpu]
(`--models ''`, `--cards ''` or `--swap-models ''`: none of those rows.)

--cpu tries the script itself on a machine without a GPU: the GPU's precisions on the CPU's kernels, as the
tests' card matrix runs them (every card's device is the CPU, with no memory cap; the model rows see an 80 GB
bf16 card), with no time budget unless one is given. Rows that need bitsandbytes' NF4 (CUDA only) are skipped;
the card rows use the tiny Flux alone unless --card-models says otherwise (a shallow Flux row took over 15
minutes on a 2-core CPU: it has no native bf16 or fp16 kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gui import devices, events, infer, quantization
from lora_gui.bench import model_folder
from lora_gui.config import TrainConfig, load_preset
from lora_gui.demo import write_demo_dataset
from lora_gui.estimate import denoiser_parameters
from lora_gui.infer import Generator
from lora_gui.quantization import QUANTIZATIONS
from lora_gui.tiny import write_tiny_model
from lora_gui.training import train

# name: (family, resolution, steps, batch size, also train the text encoders with gradient checkpointing,
# the frozen denoiser's quantization)
MODELS = {
    "tiny-sd15": ("sd15", 64, 4, 2, True, "none"),
    "tiny-sd2": ("sd2", 64, 4, 2, True, "none"),
    "tiny-sdxl": ("sdxl", 64, 4, 2, True, "none"),
    "tiny-flux": ("flux", 64, 4, 2, False, "none"),  # Flux LoRAs train the transformer alone
    "tiny-flux2-klein": ("flux2-klein", 64, 4, 2, False, "none"),  # so do Flux.2 klein's
    "tiny-chroma": ("chroma", 64, 4, 2, False, "none"),  # and Chroma's
    "tiny-flux2-dev": ("flux2-dev", 64, 4, 2, False, "none"),  # and dev's (--models names it: klein's paths)
    "tiny-flux-int8": ("flux", 64, 4, 2, False, "int8"),  # the 16 and 24 GB presets' base
    "tiny-flux-nf4": ("flux", 64, 4, 2, False, "nf4"),  # the 12 GB preset's: bitsandbytes on CUDA only
    "tiny-zimage": ("zimage", 64, 4, 2, False, "none"),  # Z-Image LoRAs train the transformer alone
    "tiny-qwen-image": ("qwen-image", 64, 4, 2, False, "none"),  # so do Qwen-Image's
    "tiny-zimage-int8": ("zimage", 64, 4, 2, False, "int8"),  # the Z-Image presets' base
    "sd15": ("sd15", 512, 4, 1, False, "none"),  # the real SD 1.5 architecture, random weights
}
# The card rows train the tiny Flux with the int8 and NF4 bases in both precisions, so by default the model rows
# leave out tiny-flux-int8 and tiny-flux-nf4 (--models names them, for a run without card rows).
DEFAULT_MODELS = (
    "tiny-sd15",
    "tiny-sd2",
    "tiny-sdxl",
    "tiny-flux",
    "tiny-flux2-klein",
    "tiny-chroma",
    "tiny-zimage-int8",
    "tiny-qwen-image",
    "sd15",
)
CARD_MODELS = ("tiny-flux", "flux-shallow")
# The Flux presets, by the card they are made for.
CARD_PRESETS = {12: "flux-dev-12gb", 16: "flux-dev-16gb", 24: "flux-dev-24gb"}
# Flux.1-dev's parts as published (black-forest-labs/FLUX.1-dev), for Generate's notion of a card row's model size;
# its transformer is counted by the engine (estimate.denoiser_parameters, on the meta device).
FLUX_DEV_PARTS = {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683}

# What each part takes on an H100, in seconds, conservatively (see the docstring); a part starts only if it fits.
SECONDS = {"tiny": 10, "sd15": 35, "sd15-write": 20, "card-tiny": 12, "card-shallow": 35, "shallow-write": 40}
SECONDS["swap"] = 40 + 2 * 25  # the shallow Z-Image written, then trained with and without block swap
SWAP_MODELS = ("zimage-shallow", "tiny-zimage")  # a benchmark model (lora_gui/bench.py), or a tiny one
BUDGET = 230.0  # of scripts/gpu_bench.sh's `timeout 240`, from the process's start
CPU_CARD_GB = 80.0  # the card the model rows see with --cpu: an H100's

failures: list[str] = []
skipped: list[str] = []
DEVICE = "cuda"  # where the runs must have run
_IMPORTED = time.monotonic()


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


def skip(name: str, why: str) -> None:
    skipped.append(name)
    print(f"SKIP {name}: {why}", flush=True)


def picture_stats(image: Image.Image) -> str:
    pixels = np.asarray(image, dtype=np.float32)
    if not np.isfinite(pixels).all() or pixels.std() <= 1.0:
        raise AssertionError(f"a flat picture (mean {pixels.mean():.1f}, std {pixels.std():.2f}): NaN or overflow")
    return f"{image.width}x{image.height}, std {pixels.std():.1f}"


def seconds_running() -> float:
    """How long this process has run, its imports included (Linux's /proc), as `timeout` counts it."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks after boot
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def trained(config: TrainConfig, run: Path, precision: str, received: list[events.Event]) -> str:
    """Train, check the run was on the device in `precision` with finite losses and LoRA; what it measured."""
    train(config, run, on_event=received.append)
    started = next(e for e in received if e.kind == events.STARTED).data
    if started["device"].split(":")[0] != DEVICE or started["precision"] != precision:
        raise AssertionError(f"ran on {started['device']} in {started['precision']}, not on {DEVICE} in {precision}")
    losses = [e.data["loss"] for e in received if e.kind == events.STEP]
    if len(losses) != config.max_steps or not np.isfinite(losses).all():
        raise AssertionError(f"losses {losses}")
    weights = load_file(run / "pytorch_lora_weights.safetensors")
    if not all(torch.isfinite(tensor).all() for tensor in weights.values()):
        raise AssertionError("the LoRA file holds NaN or inf")
    return (
        f"{len(losses)} steps on {started['device']} in {started['precision']}, loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f}, {len(weights)} finite LoRA tensors"
    )


def previews(received: list[events.Event]) -> str:
    paths = [path for e in received if e.kind == events.SAMPLES for path in e.data["paths"]]
    if len(paths) < 2:
        raise AssertionError(f"{len(paths)} preview images, expected one mid-run and one at the end")
    return f"{len(paths)} pictures, " + "; ".join(picture_stats(Image.open(path)) for path in paths)


def tiny_model(workdir: Path, family: str) -> Path:
    folder = workdir / f"smoke-tiny-{family}"
    if not (folder / "model_index.json").is_file():
        write_tiny_model(folder, family)
    return folder


# ---- model rows ----------------------------------------------------------------------------------------------
def smoke(model: str, precision: str, workdir: Path) -> None:
    family, resolution, steps, batch_size, text_encoder, quantize = MODELS[model]
    # The real SD 1.5 is the benchmark's model: the rows of scripts/gpu_bench.sh reuse it.
    folder = tiny_model(workdir, family) if model.startswith("tiny-") else model_folder(workdir, model)
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
        detail = trained(config, run, precision, received)
        return detail + (f", peak {devices.peak_gpu_memory_gb():.2f} GB" if DEVICE == "cuda" else "")

    if not check(f"{label} train", training):
        return
    check(f"{label} previews", lambda: previews(received))

    def generate() -> str:
        generator = Generator.load(str(folder), precision=precision)
        denoiser = generator.family.denoiser(generator.pipe)
        dtypes = f"{generator.family.denoiser_title} {denoiser.dtype}, VAE {generator.pipe.vae.dtype}"
        generator.set_loras([(run, 1.0)])
        image = generator("a photo of a red circle", steps=4, width=resolution, height=resolution)
        del generator
        devices.free_memory()
        return f"{dtypes}; {picture_stats(image)}"

    check(f"{label} generate", generate)


# ---- card rows -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def simulated_card(size_gb: float, bf16: bool) -> Iterator[devices.Card]:
    """The engine sees a card of this size that computes bf16 or fp16 only, and on a GPU the process can't take
    more of it than that (PyTorch's allocator refuses; CUDA's own context comes on top, as on a real card)."""
    card = devices.Card(size_gb, bf16=bf16, device=torch.device(DEVICE))
    seen_before = devices.card
    devices.card = lambda: card
    if DEVICE == "cuda":
        devices.free_memory()  # nothing cached from earlier checks counts against the cap
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, size_gb / total_gb))
    try:
        yield card
    finally:
        devices.card = seen_before
        if DEVICE == "cuda":
            devices.free_memory()
            torch.cuda.set_per_process_memory_fraction(1.0)


def folder_parameters(folder: Path) -> dict[str, int]:
    """Each part's parameters in a diffusers folder, from its safetensors headers (as stored: unquantized)."""
    counts = {}
    for part in folder.iterdir():
        files = sorted(part.glob("*.safetensors")) if part.is_dir() else []
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                shapes = [handle.get_slice(name).get_shape() for name in handle.keys()]  # noqa: SIM118 (no dict)
            counts[part.name] = counts.get(part.name, 0) + sum(math.prod(shape) for shape in shapes)
    return counts


@functools.cache
def flux_dev_transformer() -> int:
    return denoiser_parameters("flux")


@dataclass
class FluxDevSize:
    """Generate's measures of a model's size, as if the model in `folder` were Flux.1-dev, part by part: its
    denoiser's parameters (which quantization fits the card) and the bytes the loaded pipeline's weights take
    (whether it all fits, or its parts come to the GPU in turn). Each part's bytes as loaded (quantized or not)
    are scaled by Flux.1-dev's parameters over its own."""

    folder: Path
    denoiser: str = "transformer"

    def __post_init__(self) -> None:
        self.own = folder_parameters(self.folder)
        self.published = {**FLUX_DEV_PARTS, self.denoiser: flux_dev_transformer()}

    def part_bytes(self, name: str, part: torch.nn.Module) -> float:
        return quantization.stored_bytes(part) * self.published.get(name, 0) / self.own.get(name, 1)

    def pipeline_bytes(self, pipe) -> float:
        return sum(self.part_bytes(n, p) for n, p in pipe.components.items() if isinstance(p, torch.nn.Module))

    @contextlib.contextmanager
    def told_to_generate(self) -> Iterator[None]:
        """Generate measures the model as Flux.1-dev for the block (the engine's own measures are put back after)."""
        measures = {
            "denoiser_parameters_on_disk": lambda base_model, policy=None: self.published[self.denoiser],
            "_weight_bytes": lambda pipe: int(self.pipeline_bytes(pipe)),
        }
        missing = [name for name in measures if not callable(getattr(infer, name, None))]
        if missing:
            raise AssertionError(
                f"lora_gui.infer has no {', '.join(missing)} any more: make FluxDevSize replace the engine's "
                "measures of a model's size"
            )
        saved = {name: getattr(infer, name) for name in measures}
        for name, measure in measures.items():
            setattr(infer, name, measure)
        try:
            yield
        finally:
            for name, measure in saved.items():
                setattr(infer, name, measure)


def stored_as(module: torch.nn.Module) -> str:
    """How a denoiser's linear layers store their weights: nf4, int8 (torchao's class) or a plain dtype."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            weight = layer.weight
            if hasattr(weight, "quant_state"):
                return "nf4"
            if hasattr(weight, "__tensor_flatten__"):  # a torchao tensor subclass
                return f"int8 ({type(weight).__name__})"
            return f"unquantized {str(weight.dtype).removeprefix('torch.')}"
    return "no linear layers"


def placement(pipe) -> tuple[bool, str]:
    """Whether the pipeline offloads, and where each of its parts is."""
    parts = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    hooked = sorted(name for name, part in parts.items() if hasattr(part, "_hf_hook"))
    if hooked:
        device = getattr(pipe, "_offload_device", "the device")
        resident = sorted(set(parts) - set(hooked))
        also = f"; {', '.join(resident)} stay put" if resident else ""
        return True, f"model offload ({', '.join(hooked)} wait in CPU memory, each on {device} in its turn{also})"
    where = sorted({str(weight.device) for part in parts.values() for weight in part.parameters()})
    return False, f"no offload (all on {', '.join(where)})"


def preset_for(size_gb: float) -> str:
    """The Flux preset made for the largest card up to this size (the smallest preset's for a smaller one)."""
    fitting = [gb for gb in CARD_PRESETS if gb <= size_gb]
    return CARD_PRESETS[max(fitting) if fitting else min(CARD_PRESETS)]


def card_row(size_gb: float, bf16: bool, model: str, workdir: Path) -> None:
    precision = "bf16" if bf16 else "fp16"
    label = f"card-{size_gb:g}gb-{precision} {model}"
    folder = tiny_model(workdir, "flux") if model == "tiny-flux" else model_folder(workdir, model)
    pictures = write_demo_dataset(workdir / "smoke-images-64", count=4, size=(64, 64))
    run = workdir / f"smoke-run-card-{size_gb:g}gb-{precision}-{model}"
    shutil.rmtree(run, ignore_errors=True)
    preset = preset_for(size_gb)
    config = load_preset(preset).replace(
        base_model=str(folder),
        data=str(pictures),
        resolution=64,
        max_steps=2,
        epochs=0,
        mixed_precision="auto",  # the card says which
        sample_every=1,
        sample_steps=2,
        checkpoint_every=2,
    )
    settings = (
        f"{preset}'s {config.quantize_base} base, rank {config.rank}, {config.optimizer}"
        + (", checkpointing" if config.gradient_checkpointing else "")
        + " at 64 px"
    )
    size = FluxDevSize(folder)
    received: list[events.Event] = []

    def peak_within(cap_gb: float) -> str:
        if DEVICE != "cuda":
            return "no memory cap on the CPU"
        peak = devices.peak_gpu_memory_gb()
        if peak > cap_gb:
            raise AssertionError(f"peak {peak:.2f} GB, over the {cap_gb:g} GB cap")
        return f"peak {peak:.2f} GB of the {cap_gb:g} GB cap"

    with simulated_card(size_gb, bf16) as card:

        def training() -> str:
            devices.reset_peak_memory()
            detail = trained(config, run, precision, received)
            return f"{settings}: {detail}; {peak_within(card.memory_gb)}"

        if not check(f"{label} train", training):
            return
        check(f"{label} previews", lambda: previews(received))

        def generate() -> str:
            devices.reset_peak_memory()
            with size.told_to_generate():
                generator = Generator.load(str(folder), precision="auto", quantize="auto")
            try:
                return generated_on_card(generator, card, precision, size, run) + f"; {peak_within(card.memory_gb)}"
            finally:  # a failed check frees the model too, before the next row's cap
                del generator
                devices.free_memory()

        check(f"{label} generate", generate)


def generated_on_card(generator: Generator, card: devices.Card, precision: str, size: FluxDevSize, run: Path) -> str:
    """Check what Generate chose for a card, make a picture with the LoRA on, and say what it measured."""
    pipe, family = generator.pipe, generator.family
    denoiser = family.denoiser(pipe)
    offloaded, where = placement(pipe)
    denoiser_gb = size.part_bytes(family.denoiser_name, denoiser) / 2**30
    all_gb = size.pipeline_bytes(pipe) / 2**30
    as_flux = f"as Flux.1-dev: {denoiser_gb:.1f} GB {family.denoiser_title}, {all_gb:.1f} GB in all"
    if generator.precision != precision:
        raise AssertionError(f"Generate computes in {generator.precision} on a {card.describe()}")
    if denoiser_gb > card.memory_gb:  # it must fit whole, when its turn comes
        raise AssertionError(f"a {stored_as(denoiser)} {family.denoiser_title} can't fit the card ({as_flux})")
    if all_gb > card.memory_gb and not offloaded:
        raise AssertionError(f"{where}, but it does not all fit the card ({as_flux})")
    generator.set_loras([(run, 1.0)])
    image = generator("a photo of a red circle", steps=4, width=64, height=64)
    return f"{stored_as(denoiser)} {family.denoiser_title} in {generator.precision}, {where}; {as_flux}; " + (
        picture_stats(image)
    )


# ---- the plan ------------------------------------------------------------------------------------------------
# ---- block swap -----------------------------------------------------------------------------------------------
def swap_rows(model: str, workdir: Path) -> None:
    """Train `model` 3 steps without, then with block swap (2 blocks): step time, peak memory, the same losses."""
    tiny = model.startswith("tiny-")
    folder = tiny_model(workdir, model.removeprefix("tiny-")) if tiny else model_folder(workdir, model)
    resolution = 64 if tiny else 512
    pictures = write_demo_dataset(workdir / f"smoke-images-{resolution}", count=4, size=(resolution, resolution))
    losses: dict[int, list[float]] = {}
    peaks: dict[int, float] = {}

    def row(swap: int) -> str:
        run = workdir / f"smoke-run-swap{swap}-{model}"
        shutil.rmtree(run, ignore_errors=True)
        config = TrainConfig(
            base_model=str(folder),
            data=str(pictures),
            resolution=resolution,
            max_steps=3,
            batch_size=1,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            blocks_to_swap=swap,
            sample_every=0,
            learning_rate=1e-4,
        )
        received: list[events.Event] = []
        devices.reset_peak_memory()
        detail = trained(config, run, "bf16", received)
        steps = [e.data for e in received if e.kind == events.STEP]
        losses[swap] = [step["loss"] for step in steps]
        peaks[swap] = devices.peak_gpu_memory_gb() if DEVICE == "cuda" else 0.0
        per_step = (steps[-1]["seconds"] - steps[0]["seconds"]) / (len(steps) - 1)
        detail += f"; {per_step:.2f} s a step after the first, peak {peaks[swap]:.2f} GB"
        if swap:
            apart = max(abs(a - b) for a, b in zip(losses[0], losses[swap], strict=True))
            detail += f"; losses at most {apart:.2e} from the run without it"
            if DEVICE == "cuda" and peaks[swap] >= peaks[0]:
                raise AssertionError(f"peak {peaks[swap]:.2f} GB with block swap, {peaks[0]:.2f} GB without")
        return detail

    if check(f"block-swap-0 {model} train", lambda: row(0)):
        check(f"block-swap-2 {model} train", lambda: row(2))


@dataclass
class Part:
    name: str
    seconds: float  # what it needs on an H100, conservatively: it starts only if that much is left
    run: Callable[[], None]


def plan(
    models: list[str],
    cards: list[float],
    card_models: list[str],
    card_bf16: list[bool],
    workdir: Path,
    swap_models: list[str] = (),
) -> list[Part]:
    """Every part, most important first (see the docstring)."""
    parts = []

    def model_rows(model: str) -> list[Part]:
        rows = []
        if DEVICE != "cuda" and QUANTIZATIONS[MODELS[model][-1]].needs_cuda:
            return [Part(model, 0, lambda: skip(model, "its quantization runs only on CUDA"))]
        for index, precision in enumerate(("bf16", "fp16")):
            needs = SECONDS["tiny"] if model.startswith("tiny-") else SECONDS["sd15"]
            if model == "sd15" and index == 0:
                needs += SECONDS["sd15-write"]
            rows.append(Part(f"{model} {precision}", needs, lambda m=model, p=precision: smoke(m, p, workdir)))
        return rows

    def card_rows(model: str, sizes: list[float], first: bool) -> list[Part]:
        rows = []
        shallow = model != "tiny-flux"
        for size in sizes:
            if DEVICE != "cuda" and QUANTIZATIONS[load_preset(preset_for(size)).quantize_base].needs_cuda:
                name = f"card-{size:g}gb {model}"
                rows.append(Part(name, 0, lambda n=name, s=size: skip(n, f"{preset_for(s)}'s NF4 base needs CUDA")))
                continue
            for bf16 in sorted(card_bf16, reverse=not shallow):  # bf16 first, but at full width fp16 is the risk
                needs = SECONDS["card-shallow" if shallow else "card-tiny"]
                if shallow and first and not any(row.seconds for row in rows):  # the first writes the model
                    needs += SECONDS["shallow-write"]
                name = f"card-{size:g}gb-{'bf16' if bf16 else 'fp16'} {model}"
                rows.append(Part(name, needs, lambda s=size, b=bf16: card_row(s, b, model, workdir)))
        return rows

    tiny_models = [model for model in models if model.startswith("tiny-")]
    for model in tiny_models:
        parts += model_rows(model)
    if "tiny-flux" in card_models:
        parts += card_rows("tiny-flux", cards, first=True)
    for model in swap_models:
        parts.append(Part(f"block-swap {model}", SECONDS["swap"], lambda m=model: swap_rows(m, workdir)))
    small, large = [size for size in cards if size < 24], [size for size in cards if size >= 24]
    if "flux-shallow" in card_models:
        parts += card_rows("flux-shallow", small, first=True)
    for model in models:
        if model not in tiny_models:
            parts += model_rows(model)
    if "flux-shallow" in card_models:
        parts += card_rows("flux-shallow", large, first=not small)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench-work")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}; '' for none")
    parser.add_argument("--cards", default="12,16,24", help="card sizes in GB for the card rows; '' for none")
    parser.add_argument(
        "--card-models", help=f"the card rows' models, of {', '.join(CARD_MODELS)} (all; with --cpu the tiny one)"
    )
    parser.add_argument("--card-precisions", default="bf16,fp16", help="bf16 and fp16-only cards, or one of them")
    parser.add_argument(
        "--swap-models", help=f"the block-swap rows' models, of {', '.join(SWAP_MODELS)} (with --cpu the tiny one)"
    )
    parser.add_argument("--budget", type=float, help=f"seconds from the start ({BUDGET:g}; none with --cpu)")
    parser.add_argument("--cpu", action="store_true", help="try the script without a GPU")
    args = parser.parse_args()
    models = [name for name in args.models.split(",") if name]
    cards = [float(size) for size in args.cards.split(",") if size]
    # On a CPU the shallow Flux's full-width layers take many minutes a row in bf16 and fp16 (no native kernels).
    card_models = (args.card_models or ",".join(CARD_MODELS[:1] if args.cpu else CARD_MODELS)).split(",")
    card_models = [name for name in card_models if name]
    swap_models = (args.swap_models or SWAP_MODELS[1 if args.cpu else 0]).split(",")
    swap_models = [name for name in swap_models if name]
    card_bf16 = [{"bf16": True, "fp16": False}[name] for name in args.card_precisions.split(",") if name]
    unknown = [name for name in models if name not in MODELS] + [n for n in card_models if n not in CARD_MODELS]
    unknown += [name for name in swap_models if name not in SWAP_MODELS]
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    global DEVICE
    if args.cpu:
        DEVICE = "cpu"
        budget = args.budget or math.inf
        cpu_card = devices.Card(CPU_CARD_GB, bf16=True, device=torch.device("cpu"))
        devices.card = lambda: cpu_card  # what a GPU would run, on the CPU's kernels
    elif not devices.has_cuda():
        print("FAIL setup: no CUDA GPU here (--cpu tries the script on the CPU)", flush=True)
        return 1
    else:
        budget = args.budget or BUDGET
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        print(
            f"{torch.cuda.get_device_name()}, compute capability {capability}, torch {torch.__version__}; "
            f"auto precision here: {devices.resolve_precision('auto')}",
            flush=True,
        )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for part in plan(models, cards, card_models, card_bf16, workdir, swap_models):
        left = budget - seconds_running()
        if part.seconds > left:
            needs = f"needs about {part.seconds:.0f} s on an H100"
            skip(part.name, f"{needs}, {left:.0f} s left of the {budget:.0f} s budget")
            continue
        started = time.perf_counter()
        try:
            part.run()
        except Exception as error:  # its model or pictures could not be written: the next parts still run
            failures.append(part.name)
            first_line = (str(error).strip().splitlines() or [""])[0]
            print(f"FAIL {part.name}: {type(error).__name__}: {first_line}", flush=True)
            traceback.print_exc(file=sys.stderr)
        if part.seconds:
            print(f"# {part.name}: {time.perf_counter() - started:.1f} s", flush=True)
    took = f"{seconds_running():.0f} s"
    left_out = f"; skipped: {', '.join(skipped)}" if skipped else ""
    if failures:
        print(f"FAILED: {', '.join(failures)} ({took}{left_out})", flush=True)
    else:
        print(f"all checks passed ({took}{left_out})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
