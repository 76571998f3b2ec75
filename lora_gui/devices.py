"""The machine the engine runs on: its GPU, the precision models run in there, and its memory.

Every CUDA-only decision lives here, so training, Generate, the benchmark and the app's Train tab
decide alike, and the tests can hand the whole engine a GPU's dtypes on a CPU by replacing
`resolve_precision` (tests/test_gpu_regime.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# How cuBLAS, cuDNN and the CUDA driver say they ran out of memory when it is not PyTorch's own allocator
# that failed (torch.OutOfMemoryError): their handles and workspaces are allocated outside it.
_OUT_OF_MEMORY_WORDS = ("out of memory", "ALLOC_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED")


def has_cuda() -> bool:
    """Whether PyTorch can reach a CUDA GPU: for CUDA's own calls (synchronising, its allocator). What the engine
    chooses for a card (precision, quantization, offloading, who has the GPU) asks `card()` instead."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Card:
    """The GPU the engine computes on, as its choices see it: where tensors go, how much memory it has, and whether
    it computes bf16 itself (compute capability 8.0, Ampere, and newer).

    `torch.cuda.is_bf16_supported()` also says yes on T4, V100 and RTX 20xx cards, which only emulate bf16:
    slowly, and without the flash and memory-efficient attention kernels, so memory runs out."""

    memory_gb: float
    bf16: bool
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))

    def describe(self) -> str:
        return f"{self.memory_gb:.0f} GB GPU" + ("" if self.bf16 else " without bf16 (it computes in fp16)")


def card() -> Card | None:
    """This machine's GPU; None without one. The tests' card matrix puts a card of any size here whose device is
    the CPU, so every choice a card makes runs on the CPU's kernels (tests/conftest.py, `card`)."""
    if not has_cuda():
        return None
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return Card(memory, torch.cuda.get_device_capability() >= (8, 0))


def compute_device() -> torch.device:
    """Where models compute: the card's device, else the CPU."""
    gpu = card()
    return gpu.device if gpu else torch.device("cpu")


def resolve_precision(setting: str) -> str:
    """What a mixed-precision setting means on this machine: "no", "fp16" or "bf16"."""
    gpu = card()
    if gpu is None:
        if setting in ("fp16", "bf16"):
            log.warning("No CUDA GPU: running in full precision on the CPU instead of %s", setting)
        return "no"
    if setting == "auto":
        return "bf16" if gpu.bf16 else "fp16"
    if setting == "bf16" and not gpu.bf16:
        log.warning("This GPU only emulates bf16, which is slow and needs more memory: fp16 (or auto) suits it")
    return setting


def gpu_precision(setting: str) -> str:
    """The precision a setting means on this machine's GPU, or on a current one where there is none:
    what an estimate of GPU memory assumes."""
    if card() is not None:
        return resolve_precision(setting)
    return "bf16" if setting == "auto" else setting


def use_tensor_cores() -> None:
    """Let fp32 matrix products run on TF32 tensor cores (Ampere and newer; a no-op on older cards).

    The LoRA's own weights and a full-precision run compute in fp32; without this they run at a
    fraction of the card's speed. TF32 keeps fp32's range with a 10-bit mantissa, as diffusers'
    training scripts allow with --allow_tf32 (convolutions already use it by default)."""
    if has_cuda():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the run's precision on its device; nothing in full precision."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "no")


@contextlib.contextmanager
def outside_autocast(*modules: torch.nn.Module) -> Iterator[None]:
    """These modules compute in their own dtypes for the block, even under an autocast around their callers.

    Text encoders encode as training encoded the captions, without autocast: transformers keeps T5's `wo` layers in
    fp32 when the rest of it loads in fp16, since their outputs overflow fp16, and fp16 autocast would compute them
    in fp16 anyway. So the pipelines that Generate and previews run under autocast read the prompt through these
    modules as training read the captions."""
    kinds = ("cpu", "cuda")
    saved: list[list[bool]] = []

    def off(module: torch.nn.Module, args: tuple) -> None:
        saved.append([torch.is_autocast_enabled(kind) for kind in kinds])
        for kind in kinds:
            torch.set_autocast_enabled(kind, False)

    def back(module: torch.nn.Module, args: tuple, output: object) -> None:
        for kind, enabled in zip(kinds, saved.pop(), strict=True):
            torch.set_autocast_enabled(kind, enabled)

    handles = [
        hook
        for module in modules
        for hook in (module.register_forward_pre_hook(off), module.register_forward_hook(back))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error means the GPU ran out of memory, in any of the forms the CUDA libraries report it."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in _OUT_OF_MEMORY_WORDS)


def free_memory() -> None:
    """Hand memory no tensor uses any more back: to the system, and on a GPU to other programs and runs."""
    gc.collect()
    if has_cuda():
        torch.cuda.empty_cache()


def leave_a_core_free() -> None:
    """Without a GPU, compute on all cores but one from now on (this thread and those started after it), for an app
    whose server, and often the browser showing its page, share the machine with its runs. PyTorch's threads wait for
    each other at the end of every operation, and when one of them shares its core with the page, they all wait: the
    demo's 400 steps (as it was then) took 82 s on 2 threads beside a browser on a 2-core CPU, 38 s on 1."""
    if not has_cuda():
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))


def gpu_memory_gb() -> float | None:
    """The GPU's total memory in GiB; None without a GPU."""
    gpu = card()
    return gpu.memory_gb if gpu else None


def reset_peak_memory() -> None:
    if has_cuda():
        torch.cuda.synchronize()
        free_memory()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_memory_gb() -> float:
    """The most GPU memory this process held since `reset_peak_memory`, as nvidia-smi counts it.

    PyTorch's allocator reserves more than its tensors take (`max_memory_allocated`), and the CUDA
    context with cuBLAS, cuDNN and the kernels loaded so far comes on top: a card must hold all of it.
    That last share is what the device uses beyond the allocator's reservation now (it only grows),
    so on a GPU that other programs share it counts theirs too."""
    free, total = torch.cuda.mem_get_info()
    beyond_allocator = total - free - torch.cuda.memory_reserved()
    return (torch.cuda.max_memory_reserved() + max(0, beyond_allocator)) / 2**30


def matmul_tflops() -> float:
    """The GPU's measured matrix-multiply rate in the half precision training uses on it (bf16, or fp16
    where the card only emulates bf16): the ceiling for model FLOPs utilisation, and what the Train
    tab's time estimate divides by."""
    dtype = DTYPES[resolve_precision("auto")]
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    repeats, started = 20, time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * repeats / (time.perf_counter() - started) / 1e12


# What a module borrowed for a pass needs beside its weights (a batch of captions' activations through a text encoder).
BORROWED_WORK_BYTES = 2**30


class Offload:
    """The modules on the compute device now; the rest wait in CPU memory until their phase.

    A GPU holds only what the phase at hand uses: the VAE and text encoders while images and
    captions are encoded, the UNet while it trains (SDXL's alone is 5 GB in bf16), and for previews
    the UNet with the text encoders, then with the VAE. `room`: the bytes the modules borrowed for a
    pass may take on the device before the largest stream their layers instead; None: the memory free
    there when they come (no limit on a processor)."""

    def __init__(self, device: torch.device, room: int | None = None):
        self.device = device
        self.room = room
        self.on_device: list[torch.nn.Module] = []

    def bring(self, *modules: torch.nn.Module) -> None:
        for module in modules:
            module.to(self.device)
            if not self.holds(module):
                self.on_device.append(module)

    def holds(self, module: torch.nn.Module) -> bool:
        return any(module is present for present in self.on_device)

    def park(self, *modules: torch.nn.Module) -> None:
        for module in modules:
            module.to("cpu")
        self.on_device = [present for present in self.on_device if not any(present is m for m in modules)]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def borrowed(self, *modules: torch.nn.Module) -> Iterator[None]:
        """These frozen modules on the device for the block, back in CPU memory after it. Where they don't all fit
        the room, the largest compute with their layers streamed (`streamed_layers`): a text encoder larger than the
        card (Flux.2 dev's Mistral is 48 GB in bf16) encodes the captions the same, copying its layers once a pass."""
        whole, streamed = self._fitting(modules)
        self.bring(*whole)
        try:
            with contextlib.ExitStack() as stack:
                for module in streamed:
                    stack.enter_context(streamed_layers(module, self.device))
                yield
        finally:
            self.park(*whole)

    def _fitting(self, modules: tuple[torch.nn.Module, ...]) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """The modules that fit the room whole, the smallest first, and the others."""
        room = self.room
        if room is None and self.device.type == "cuda":
            room = torch.cuda.mem_get_info(self.device)[0] - BORROWED_WORK_BYTES
        whole: list[torch.nn.Module] = []
        streamed: list[torch.nn.Module] = []
        taken = 0
        for module in sorted(modules, key=_bytes):
            taken += _bytes(module)
            (whole if room is None or taken <= room or self.holds(module) else streamed).append(module)
        return whole, streamed


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _bytes(module: torch.nn.Module) -> int:
    return sum(tensor.nbytes for tensor in _tensors(module))


@contextlib.contextmanager
def streamed_layers(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """A frozen `module` computes on `device` with one of its layers there at a time: all but its layers (its largest
    list of blocks) comes whole, each layer's weights for its own forward, then they point back at their copies in
    CPU memory (nothing is copied back). Forward only: the same results as the whole module on the device."""
    lists = [child for child in module.modules() if isinstance(child, torch.nn.ModuleList)]
    layers = max(lists, key=_bytes) if lists else torch.nn.ModuleList()
    inside = {id(tensor) for tensor in _tensors(layers)}
    resting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # each tensor on the device now, and its CPU data

    def bring(tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if id(tensor) not in resting:
                resting[id(tensor)] = (tensor, tensor.data)
                # A copy even where the device is the processor, so the tests see each layer come and go.
                tensor.data = tensor.data.to(device, non_blocking=True, copy=True)

    def back(tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if id(tensor) in resting:
                tensor.data = resting.pop(id(tensor))[1]

    bring([tensor for tensor in _tensors(module) if id(tensor) not in inside])
    handles = [
        handle
        for layer in layers
        for handle in (
            layer.register_forward_pre_hook(lambda layer, args: bring(_tensors(layer))),
            layer.register_forward_hook(lambda layer, args, output: back(_tensors(layer))),
        )
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        back([tensor for tensor, _ in list(resting.values())])
