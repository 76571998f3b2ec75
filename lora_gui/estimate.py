"""Before training: about how much GPU memory a run needs and how long it takes.

Nothing is downloaded or computed for real. The family's UNet is built on PyTorch's meta device
(shapes without data), the LoRA is injected as training would, and one forward pass counts what
backward will need: every tensor autograd saves (attention counted as the flash / memory-efficient
kernels keep it: inputs, output and log-sum-exp, not the full attention matrix) and every FLOP.
Counting a published model at 1024 px takes 10 to 20 s, so each count is kept on disk (`_kept_on_disk`), and a
restarted app's first estimate, or another process's, is instant.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from lora_gui import block_swap
from lora_gui.atomic import atomic_path
from lora_gui.config import TrainConfig
from lora_gui.devices import BORROWED_WORK_BYTES, DTYPES
from lora_gui.families import Family, get_family
from lora_gui.optimizers import OPTIMIZERS
from lora_gui.quantization import QUANTIZATIONS

CUDA_OVERHEAD_GB = 0.4  # CUDA context and allocator slack, on top of what tensors take
# Share of the GPU's peak matmul rate a LoRA step reaches; calibrate with `python -m lora_gui bench`.
STEP_EFFICIENCY = 0.35
BYTES = {"no": 4, "fp16": 2, "bf16": 2}
# A processor's pace, from BENCHMARKS.md's CPU rows (2 cores, fp32): one 512 px picture through SD 1.5's denoiser
# (0.86 billion weights) with its LoRA, forward and backward, took 8.2 s. Other models and sizes are scaled from it
# by their weights and pixels: rough, as processors differ more than GPUs of a kind do.
CPU_STEP = {"seconds": 8.2, "cores": 2, "weights": 0.86e9, "resolution": 512}
# The demo and tiny models are too small to keep a processor busy (each step is mostly overhead), so their pace
# is the demo's own in the app: its 250 steps of 2 pictures at 64 px, previews included, take about 22 s on one of
# those 2 cores (the app leaves the other to the page); more pixels cost more.
TINY_SECONDS_PER_PICTURE = 22 / (250 * 2)
TINY_RESOLUTION = 64
# Block swap: what moves the swapped blocks from the computer's memory to the GPU, in bytes per second. A PCIe 4.0 x16
# slot carries about 25 GB/s from pinned memory at best, PCIe 3.0 x16 half that, and a copy beside the GPU's own work
# gets less: 16 GB/s, a current card's typical share (research notes: qwenimage-blockswap.md, section 11).
PCIE_BYTES_PER_SECOND = 16e9
# Where the GPU's speed is not measured (Suggest settings sizing for a card): an RTX 3090's bf16 matrix rate as
# devices.matmul_tflops measures it, about 70 TFLOPS (a 4090's is about twice that), the card most guides train on.
REFERENCE_TFLOPS = 70.0
# Gradient checkpointing computes each block's forward again in backward: a step's work is forward (1) and backward
# (2) and the recomputed forward (1), 4/3 of a step without it.
RECOMPUTE = 4 / 3
_ESTIMATING = threading.Lock()


@dataclass
class Estimate:
    memory_gb: float  # the largest of the three phases below, with CUDA's own share
    caching_gb: float  # encoding the images: the VAE and the text encoders
    training_gb: float  # the UNet's steps
    previews_gb: float  # preview images: the denoiser, then the VAE beside it
    step_tflop: float | None  # the step's work, counted only when the time is estimated
    seconds: float | None  # None when the device's speed is unknown
    notes: str
    # Block swap: how much slower a step is for it (0.25: 25%), the transfer that can't hide behind compute and the
    # recomputing it turns on (at REFERENCE_TFLOPS where the GPU's speed is unknown); None when no block swaps.
    swap_slowdown: float | None = None
    swap_note: str = ""  # what block swap does to the run, in words ("" without it); in `notes` too

    def summary(self) -> str:
        time = f"about {duration(self.seconds)}" if self.seconds is not None else "unknown time"
        return f"≈ {self.memory_gb:.1f} GB of GPU memory, {time}. {self.notes}"


def estimate(
    config: TrainConfig,
    family: str,
    precision: str = "bf16",
    matmul_tflops: float | None = None,
    card_gb: float | None = None,
) -> Estimate:
    """Memory and time of a run with these settings on a model of this family.

    `precision` is the resolved mixed precision ("no", "fp16", "bf16"); `matmul_tflops` the
    device's measured matrix-multiply rate (see devices.matmul_tflops), for the time; `card_gb` the
    card's memory, where text encoders that don't fit it whole encode with their layers streamed."""
    kind = get_family(family)
    targets = tuple(kind.lora_targets(config.target_modules))
    adapter = (config.rank, config.lora_type)
    size, text_encoder_params = _published_model(config.base_model, family)
    swapping = config.blocks_to_swap > 0 and bool(kind.swap_blocks)
    # The engine turns gradient checkpointing on with block swap: backward reads each streamed block's weights anew.
    checkpointing = config.gradient_checkpointing or swapping
    cost = _unet_cost(family, size, config.resolution, adapter, targets, checkpointing, precision)
    swapped, swapped_bytes, ring = _swapped(cost, config.blocks_to_swap if swapping else 0, precision, config)
    # Each trained weight: itself and its gradient in fp32, and the optimizer's state. Schedule-free AdamW's copy
    # of the training weights, while it evaluates, takes the gradients' place (they are freed after each step).
    optimizer_bytes = 4 + 4 + OPTIMIZERS[config.optimizer].state_bytes
    # Swapped blocks wait in the computer's memory: the GPU holds the ring of slots they pass through instead.
    denoiser = _denoiser_bytes(cost, precision, config.quantize_base) - swapped_bytes + ring
    base = denoiser + cost.lora_params * optimizer_bytes
    text = _text_encoder_bytes(family, text_encoder_params, precision)
    vae = kind.vae_params * 4
    training_peak = base + cost.activations * config.batch_size
    if config.train_text_encoder:
        training_peak += text
    # Previews (at least one set, at the end): frozen text encoders encoded the prompts while caching and
    # never come back; trained ones never left. The VAE comes to decode.
    previews_peak = base + vae + _preview_bytes(config.resolution) + (text if config.train_text_encoder else 0)
    # While caching, the VAE encodes one image at a time at full resolution (in fp32), then the text encoders
    # the captions: they take turns, and the denoiser comes onto the GPU only after both are parked.
    encoding, streamed = _encoding_bytes(kind, config, text, card_gb)
    caching_peak = max(encoding, vae + _vae_encode_bytes(config.resolution))
    phases = [peak / 2**30 + CUDA_OVERHEAD_GB for peak in (caching_peak, training_peak, previews_peak)]
    step_tflop, seconds, slowdown = _time(
        config, family, size, adapter, targets, precision, matmul_tflops, swapped_bytes
    )
    notes = [_placement_note(kind, config, text, streamed)]
    if config.quantize_base != "none":
        notes.append(f"The frozen {kind.denoiser_title} is stored {QUANTIZATIONS[config.quantize_base].title}.")
    swap = swap_note(swapped, len(cost.blocks), swapped_bytes, slowdown) if swapping else ""
    memory = (round(phase, 2) for phase in phases)
    notes_text = " ".join(note for note in (*notes, swap) if note)
    return Estimate(round(max(phases), 2), *memory, step_tflop, seconds, notes_text, slowdown, swap)


def processor_seconds(config: TrainConfig, family: str, tiny: bool, cores: int | None = None) -> float | None:
    """Roughly how long a run with these settings takes on this computer's processor (None when Epochs sets the
    length: that depends on the pictures): a demo or tiny model at the demo's pace, a real one at SD 1.5's measured
    pace scaled to its weights, pixels and this processor's cores."""
    if config.epochs:
        return None
    pictures = config.max_steps * config.batch_size * config.gradient_accumulation_steps
    if tiny:
        return pictures * TINY_SECONDS_PER_PICTURE * max(1.0, (config.resolution / TINY_RESOLUTION) ** 2)
    scale = (config.resolution / CPU_STEP["resolution"]) ** 2 * denoiser_parameters(family) / CPU_STEP["weights"]
    return pictures * CPU_STEP["seconds"] * scale * CPU_STEP["cores"] / (cores or torch.get_num_threads())


@dataclass(frozen=True)
class DenoiserCost:
    """One training step of one image through the denoiser with its LoRA."""

    activations: float  # bytes autograd keeps for backward
    lora_params: int
    denoiser_params: int  # the frozen base's
    linear_weights: int  # of those, the weights of its linear layers: what quantizing stores in fewer bits
    largest_linear: int  # the most weights one linear layer holds: a quantized one is unpacked for its product
    # The blocks that may swap (`Family.swap_blocks`), in the order they run: each one's frozen parameters and, of
    # those, its linear layers' weights.
    blocks: tuple[tuple[int, int], ...] = ()


@functools.lru_cache(maxsize=8)
def denoiser_parameters(family: str) -> int:
    """How many parameters the family's published denoiser has, counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in get_family(family).build_denoiser("full").parameters())


def swappable_blocks(config: TrainConfig, family: str) -> int:
    """How many of the denoiser's blocks can swap (`Family.swap_blocks`) on the published model these settings are
    sized for: 0 where none can."""
    if not get_family(family).swap_blocks:
        return 0
    return _block_count(family, _published_model(config.base_model, family)[0])


@functools.lru_cache(maxsize=8)
def _block_count(family: str, size: str) -> int:
    with torch.device("meta"):
        denoiser = get_family(family).build_denoiser(size)
    return sum(len(getattr(denoiser, name)) for name in get_family(family).swap_blocks)


def presets_that_fit(family: str, precision: str, memory_gb: float) -> list[tuple[str, float]]:
    """The presets made for this family's models whose estimate fits a card of `memory_gb`, each with its
    estimate, the most demanding first (the one that makes the most of the card)."""
    from lora_gui.base_models import family_from_files
    from lora_gui.config import list_presets, load_preset

    fitting = []
    for name in list_presets():
        preset = load_preset(name)
        if (preset.family if preset.family != "auto" else family_from_files(preset.base_model)) != family:
            continue
        memory = estimate(preset, family, precision, card_gb=memory_gb).memory_gb
        if memory <= memory_gb:
            fitting.append((name, memory))
    return sorted(fitting, key=lambda named: -named[1])


def _published_model(base_model: str, family: str) -> tuple[str, float]:
    """The size of the family's denoiser the estimate builds for this base model, and its text encoders' parameters
    (`Family.estimate_model`: klein 9B's are not klein 4B's)."""
    from lora_gui.base_models import denoiser_parameters_on_disk

    return get_family(family).estimate_model(base_model, denoiser_parameters_on_disk(base_model))


def _text_encoder_bytes(family: str, parameters: float, precision: str) -> float:
    """The text encoders' weights as they load: in fp16, the layers transformers keeps in fp32 take 4 bytes."""
    fp32_extra = get_family(family).text_encoder_fp32_params * 2 if precision == "fp16" else 0
    return parameters * BYTES[precision] + fp32_extra


def _denoiser_bytes(cost: DenoiserCost, precision: str, quantize: str) -> float:
    """The frozen denoiser's memory, with its linear layers' weights quantized as `quantize` says (in fp16, int8
    is scaled per group: see quantization.FP16_INT8_GROUP)."""
    unpacked = cost.largest_linear * BYTES[precision] if quantize != "none" else 0
    return _stored_bytes(cost.denoiser_params, cost.linear_weights, precision, quantize) + unpacked


def _stored_bytes(params: int, linear_weights: int, precision: str, quantize: str) -> float:
    """Frozen parameters as the base stores them: the linear layers' weights quantized as `quantize` says."""
    weight_bytes = BYTES[precision]
    if quantize == "none":
        return params * weight_bytes
    per_weight = QUANTIZATIONS[quantize].weight_bytes(DTYPES[precision])
    return (params - linear_weights) * weight_bytes + linear_weights * per_weight


def _swapped(cost: DenoiserCost, count: int, precision: str, config: TrainConfig) -> tuple[int, float, float]:
    """How many blocks swap (no more than the denoiser has), their bytes as the base stores them, and the ring of
    GPU slots they pass through (block_swap.RING of the largest: one computing, the next arriving). The swapped
    blocks are the engine's own choice (block_swap.evenly_spaced), so that each one's copy overlaps the work of the
    blocks kept between them."""
    sizes = [_stored_bytes(params, linear, precision, config.quantize_base) for params, linear in cost.blocks]
    count = min(count, len(sizes))
    if not count:
        return 0, 0.0, 0.0
    chosen = [sizes[index] for index in block_swap.evenly_spaced(len(sizes), count)]
    return count, sum(chosen), block_swap.RING * max(chosen)


def _encoding_bytes(kind: type[Family], config: TrainConfig, text: float, card_gb: float | None) -> tuple[float, bool]:
    """The text encoders' memory while they encode the captions, and whether they stream: frozen text encoders that
    don't fit the card whole, with a pass's work beside them, encode with their layers streamed from the computer's
    memory (a layer at a time, as devices.Offload does), where the family says how much of them stays on the GPU
    then. They encode the same."""
    whole = text / 2**30 + CUDA_OVERHEAD_GB + BORROWED_WORK_BYTES / 2**30
    if card_gb is None or whole <= card_gb or config.train_text_encoder or kind.text_encoder_streamed_share >= 1:
        return text, False
    return text * kind.text_encoder_streamed_share, True


def _time(
    config: TrainConfig,
    family: str,
    size: str,
    adapter: tuple[int, str],
    targets: tuple[str, ...],
    precision: str,
    matmul_tflops: float | None,
    swapped_bytes: float,
) -> tuple[float | None, float | None, float | None]:
    """The step's work in TFLOP, the run's seconds and how much slower block swap makes a step (None without it):
    all None where the GPU's speed is unknown, as counting the step's work takes a while on a large model (Suggest
    settings sizes its block swap at REFERENCE_TFLOPS)."""
    if not matmul_tflops:
        return None, None, None
    flops = _step_flops(family, size, config.resolution, adapter, targets, precision)
    slowdown = None
    if swapped_bytes:
        computing = flops * config.batch_size / (matmul_tflops * 1e12 * STEP_EFFICIENCY)
        slowdown = _swap_slowdown(computing, swapped_bytes, config.gradient_checkpointing)
    step_tflop = flops * config.batch_size * config.gradient_accumulation_steps / 1e12
    steps = config.max_steps if not config.epochs else None
    seconds = steps * step_tflop / (matmul_tflops * STEP_EFFICIENCY) * (1 + (slowdown or 0)) if steps else None
    return step_tflop, seconds, slowdown


def _swap_slowdown(computing: float, swapped_bytes: float, checkpointing: bool) -> float:
    """How much longer a step of `computing` seconds takes with these bytes swapped: each pass (forward, then
    backward's recomputed forward) copies every swapped block to the GPU once, and a copy hides behind the work of
    its pass (forward a quarter of a checkpointed step, backward the rest); what is left over waits. Gradient
    checkpointing, which block swap turns on, recomputes the forward when it was off."""
    step = computing * (1 if checkpointing else RECOMPUTE)
    copying = swapped_bytes / PCIE_BYTES_PER_SECOND
    waiting = max(0.0, copying - step / 4) + max(0.0, copying - step * 3 / 4)
    return (step + waiting) / computing - 1


def swap_note(swapped: int, blocks: int, swapped_bytes: float, slowdown: float | None) -> str:
    """What block swap does to a run, in words: for the estimate's notes and Suggest settings' reason."""
    if slowdown is None:
        cost = "slower (how much shows once the GPU's speed is measured)"
    else:
        cost = "hardly slower" if slowdown < 0.01 else f"about {slowdown:.0%} slower"
    return (
        f"Block swap: {swapped} of the {blocks} blocks wait in the computer's memory ({swapped_bytes / 2**30:.1f} GB "
        f"of it) and stream to the GPU each step, {cost}."
    )


def _placement_note(kind: type[Family], config: TrainConfig, text: float, streamed: bool) -> str:
    """Where the parts that don't train wait, in words."""
    if config.train_text_encoder:
        return ""
    if streamed:
        return (
            f"The text encoders ({text / 2**30:.1f} GB, more than the card holds beside their work) encode the "
            f"captions once with their layers streamed from the computer's memory, then wait there with the VAE while "
            f"the {kind.denoiser_title} trains."
        )
    return f"Text encoders and VAE wait in CPU memory while the {kind.denoiser_title} trains."


def _unet_cost(
    family: str,
    size: str,
    resolution: int,
    adapter: tuple[int, str],
    targets: tuple[str, ...],
    checkpointing: bool,
    precision: str,
) -> DenoiserCost:
    """What one step of one image costs the denoiser in memory.

    One estimate at a time: the patched attention `_saved_bytes` installs is seen by every thread, and
    would meet another estimate's meta tensors (their FLOP count's backward would then fail)."""
    with _ESTIMATING:
        return _measured_cost(family, size, resolution, adapter, targets, checkpointing, precision)


def _step_flops(
    family: str, size: str, resolution: int, adapter: tuple[int, str], targets: tuple[str, ...], precision: str
) -> float:
    """FLOPs of one image's step through the denoiser, forward and backward, with the real attention."""
    with _ESTIMATING:
        return _counted_flops(family, size, resolution, adapter, targets, precision)


# Where counts are kept between processes: this variable's folder, else the user's cache folder.
CACHE_DIR_ENV = "LORA_GUI_CACHE_DIR"
# What a count depends on besides its arguments: the code that builds and counts the model, and the packages.
_COUNTING_CODE = ("estimate.py", "adapters.py", "adapter_kinds.py", "families")
_COUNTING_PACKAGES = ("torch", "diffusers", "peft", "transformers")


def _kept_on_disk(count: Callable) -> Callable:
    """`count(family, ...)`, remembered in this process and kept on disk: a JSON file per answer, named by the
    arguments and by a fingerprint of the code and packages that compute it, so a changed model or a new diffusers
    counts anew. Only the registry's own families (a test's made-up one is counted each time); a disk that can't be
    read or written just counts again."""

    @functools.lru_cache(maxsize=64)
    @functools.wraps(count)
    def kept(family: str, *args: object) -> object:
        if not get_family(family).__module__.startswith("lora_gui.families."):
            return count(family, *args)
        key = hashlib.sha256(repr((count.__name__, family, args, _code_fingerprint())).encode()).hexdigest()[:32]
        path = _cache_dir() / f"{count.__name__}-{key}.json"
        try:
            return _from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            pass
        answer = count(family, *args)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(dataclasses.asdict(answer) if dataclasses.is_dataclass(answer) else answer))
        except OSError:
            pass
        return answer

    return kept


def _from_json(value: object) -> object:
    if isinstance(value, dict):
        return DenoiserCost(**{**value, "blocks": tuple(tuple(block) for block in value["blocks"])})
    if isinstance(value, float | int):
        return value
    raise TypeError(f"not a count: {value!r}")


def _cache_dir() -> Path:
    folder = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora_gui"
    )
    return Path(folder) / "estimate"


@functools.cache
def _code_fingerprint() -> str:
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for name in _COUNTING_CODE:
        for path in sorted((package / name).rglob("*.py")) if (package / name).is_dir() else [package / name]:
            digest.update(path.read_bytes())
    for name in _COUNTING_PACKAGES:
        digest.update(importlib.metadata.version(name).encode())
    return digest.hexdigest()


@_kept_on_disk
def _counted_flops(
    family: str, size: str, resolution: int, adapter: tuple[int, str], targets: tuple[str, ...], precision: str
) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    unet, inputs = _meta_unet(family, size, resolution, adapter, targets, DTYPES[precision])
    counter = FlopCounterMode(display=False)
    with counter:
        sample = unet(**inputs).sample
        # A denoiser that answers with a list, a tensor for each picture, counts the same.
        sample = torch.stack(sample) if isinstance(sample, list) else sample
        sample.float().mean().backward()
    return counter.get_total_flops()


@_kept_on_disk
def _measured_cost(
    family: str,
    size: str,
    resolution: int,
    adapter: tuple[int, str],
    targets: tuple[str, ...],
    checkpointing: bool,
    precision: str,
) -> DenoiserCost:
    """`_unet_cost`, measured once for each set of arguments."""
    unet, inputs = _meta_unet(family, size, resolution, adapter, targets, DTYPES[precision])
    lora_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    unet_params = sum(p.numel() for p in unet.parameters()) - lora_params
    linears = _frozen_linear_weights(unet)

    # Without checkpointing: everything autograd saves, and what each block that checkpointing
    # would recompute on its own (a ResNet or a transformer block) saves.
    saved: dict[int, int] = {}
    block_sizes = []

    def before(module: torch.nn.Module, args: object) -> None:
        module._saved_before = sum(saved.values())

    def after(module: torch.nn.Module, args: object, output: object) -> None:
        block_sizes.append(sum(saved.values()) - module._saved_before)

    hooks = [
        handle
        for module in unet.modules()
        if isinstance(module, get_family(family).checkpointed_blocks())
        for handle in (module.register_forward_pre_hook(before), module.register_forward_hook(after))
    ]
    activations = _saved_bytes(unet, inputs, saved)
    for handle in hooks:
        handle.remove()
    if checkpointing:
        # Kept: each block's inputs; during backward one block at a time is recomputed on top.
        unet.enable_gradient_checkpointing()
        activations = _saved_bytes(unet, inputs, {}) + max(block_sizes)
    return DenoiserCost(activations, lora_params, unet_params, sum(linears), max(linears), _blocks(unet, family))


def _blocks(unet: torch.nn.Module, family: str) -> tuple[tuple[int, int], ...]:
    """Each swappable block's frozen parameters and its frozen linear layers' weights (a LoRA stays on the GPU)."""
    blocks = [block for name in get_family(family).swap_blocks for block in getattr(unet, name)]
    frozen = [sum(p.numel() for p in block.parameters() if not p.requires_grad) for block in blocks]
    return tuple(zip(frozen, (sum(_frozen_linear_weights(block)) for block in blocks), strict=True))


def _frozen_linear_weights(module: torch.nn.Module) -> list[int]:
    """The weights of each frozen linear layer: peft keeps each targeted layer as its `base_layer`, so every one is
    counted once."""
    return [m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]


def _meta_unet(
    family: str, size: str, resolution: int, adapter: tuple[int, str], targets: tuple[str, ...], dtype: torch.dtype
) -> tuple[torch.nn.Module, dict]:
    """The family's full-size UNet with the adapter (rank, lora_type), on the meta device in training mode, and one
    image's inputs."""
    from lora_gui.adapters import lora_config

    # In the training dtype, as from_pretrained(dtype=...) loads it. Cast after building, not by changing
    # torch's default dtype: that is process-wide, and a run may be training in another thread.
    with torch.device("meta"):
        # torch's own `to`: diffusers' would warn about fp32 modules, which a meta model has no use for.
        unet = torch.nn.Module.to(get_family(family).build_denoiser(size), dtype)
    unet.requires_grad_(False)
    with torch.device("meta"):  # LoRA weights without initialising them: 4x faster on Flux's 500 layers
        rank, lora_type = adapter
        unet.add_adapter(lora_config(rank, rank, targets, lora_type))
    unet.train()
    # A family with one published size takes no size (its inputs are the "full" model's).
    inputs = get_family(family).meta_inputs(resolution, dtype, **({} if size == "full" else {"size": size}))
    return unet, inputs


def _saved_bytes(unet: torch.nn.Module, inputs: dict, saved: dict[int, int]) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward pass, beyond the weights.

    Every frozen layer keeps its weight for backward (the input's gradient needs it): that memory is
    the model's own, counted once already, so it is left out here. Counting it again made SD 1.5's
    activations at 512 px 4.5 GiB in fp32 where training on a CPU measured 1.6 GiB."""
    weights = {tensor.untyped_storage()._cdata for tensor in (*unet.parameters(), *unet.buffers())}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()  # one storage counts once, however many ops keep it
        return tensor

    # The patch is seen by every thread of the process, so it hands calls on real tensors (a run
    # training beside the estimate) to the real attention; `_unet_cost` runs one estimate at a time.
    with (
        mock.patch.object(F, "scaled_dot_product_attention", _footprint_on_meta(F.scaled_dot_product_attention)),
        torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor),
    ):
        unet(**inputs)
    return sum(saved.values())


class _AttentionFootprint(torch.autograd.Function):
    """Stands in for SDPA on the meta device with the memory the fused kernels keep for backward."""

    @staticmethod
    def forward(ctx, query, key, value):  # type: ignore[override]
        output = torch.empty_like(query)
        logsumexp = torch.empty(query.shape[:-1], device=query.device, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, logsumexp)
        return output

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise NotImplementedError("only used to count memory")


def _footprint_on_meta(real: Callable) -> Callable:
    """SDPA that counts the fused kernels' memory for meta tensors and is the real one for any others."""

    def attention(query, key, value, *args, **kwargs):
        if query.device.type != "meta":
            return real(query, key, value, *args, **kwargs)
        return _AttentionFootprint.apply(query, key, value)

    return attention


def _vae_encode_bytes(resolution: int) -> float:
    # The encoder's first stage: five 128-channel fp32 maps at full resolution are alive at once, as
    # encoding on a CPU measured (0.63 GiB at 512 px, 2.50 GiB at 1024 px).
    return 5 * 128 * resolution * resolution * 4


def _preview_bytes(resolution: int) -> float:
    # The UNet's guided inference, then the VAE decode at full resolution: 0.95 GiB at 512 px at most,
    # as making previews of SD 1.5 on a CPU in fp32 measured (scripts/memory_check.py); pixels scale it.
    return 0.95 * 2**30 * (resolution / 512) ** 2


def duration(seconds: float) -> str:
    """A time as a person reads it: 40 s, 12 min, 3.5 h, 11 days (a real model on a processor)."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
