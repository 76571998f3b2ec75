"""Block swap: the frozen denoiser's blocks kept in CPU memory and streamed to the GPU in turn, for base models larger
than the card (Qwen-Image's 60 blocks take 41 GB in bf16).

`blocks_to_swap` of the denoiser's blocks (those of its lists `Family.swap_blocks` names, in the order they run), evenly
spaced among them, keep their frozen weights in CPU memory: one flat buffer per block (pinned on CUDA), their master
copy. A ring of `RING` flat buffers on the GPU (slots) holds the ones in use. Before a block runs (a forward pre-hook)
its weights are re-pointed to views of its slot, where one copy on a side CUDA stream brought them while the blocks
before it computed; a block leaving its slot is re-pointed to its master copy (the base is frozen: nothing is copied
back). The LoRA's parameters, anything else that trains and everything outside the swapped blocks stay on the GPU.
The design is musubi-tuner's LoRAStreamOffloader (its --block_swap_h2d_only).

Training needs gradient checkpointing: without it autograd keeps each block's weights for the backward pass, in the
slot a later block overwrites. With it, backward recomputes each block, in reverse order and through the same hook,
which then loads ahead towards the first block. The same kernels run on the same numbers: the loss and the LoRA are
bit for bit those of a run without block swap.

On the CPU there is no second device: the slots are more CPU buffers and the copies synchronous, and everything else
(master copies, slots, re-pointing, the hooks, the prefetch schedule) runs as on a GPU, so the tests exercise it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lora_gui.errors import ConfigError

log = logging.getLogger(__name__)

RING = 2  # GPU slots: the block computing and the next one arriving
_ALIGN = 256  # bytes: every tensor's view in a flat buffer starts at a multiple of this (any dtype's alignment)


@dataclass
class _Tensor:
    """One frozen parameter of a swapped block as its flat buffers hold it: where each tensor it is made of lies
    (a tensor subclass, torchao's int8, is several), and how to make it again from views of them."""

    module: torch.nn.Module
    name: str
    parts: list[tuple[str | None, int, torch.dtype, torch.Size]]  # (name in the subclass, byte offset, dtype, shape)
    subclass: tuple | None = None  # (class, flatten context, size, stride) of a tensor subclass; None: a plain one

    def made_from(self, flat: torch.Tensor) -> torch.nn.Parameter:
        views = {name: _view(flat, offset, dtype, shape) for name, offset, dtype, shape in self.parts}
        if self.subclass is None:
            return torch.nn.Parameter(views[None], requires_grad=False)
        cls, context, size, stride = self.subclass
        return torch.nn.Parameter(cls.__tensor_unflatten__(views, context, size, stride), requires_grad=False)


def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    size = dtype.itemsize * shape.numel()
    return flat[offset : offset + size].view(dtype).view(shape)


def _parts(tensor: torch.Tensor) -> tuple[list[tuple[str | None, torch.Tensor]], tuple | None]:
    """The plain tensors a parameter is made of, and how to make it again (see `_Tensor`)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [(None, tensor.detach())], None
    names, context = tensor.__tensor_flatten__()
    parts = [(name, getattr(tensor, name)) for name in names]
    if any(hasattr(part, "__tensor_flatten__") for _, part in parts):
        raise ConfigError("blocks_to_swap can't hold this quantized base model's weights: set blocks_to_swap to 0")
    return parts, (type(tensor), context, tensor.size(), tensor.stride())


@dataclass
class _Block:
    """A swapped block: its frozen parameters, their master copy in CPU memory, and their views in each slot."""

    tensors: list[_Tensor]
    master: torch.Tensor  # uint8, in CPU memory
    at_rest: list[torch.nn.Parameter]  # the parameters as views of the master copy
    in_slot: dict[int, list[torch.nn.Parameter]] = field(default_factory=dict)  # slot -> views of that slot

    @property
    def nbytes(self) -> int:
        return self.master.numel()

    def bind(self, parameters: list[torch.nn.Parameter]) -> None:
        for tensor, parameter in zip(self.tensors, parameters, strict=True):
            setattr(tensor.module, tensor.name, parameter)


def _frozen_tensors(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """A block's parameters that do not train (the LoRA's do, and stay where they are)."""
    return [
        (module, name, parameter)
        for module in block.modules()
        for name, parameter in module.named_parameters(recurse=False)
        if not parameter.requires_grad
    ]


def _packed(block: torch.nn.Module, pin: bool) -> _Block:
    """A block's frozen parameters copied into one flat CPU buffer, and re-pointed to it."""
    tensors, sources, offset = [], [], 0
    for module, name, parameter in _frozen_tensors(block):
        if hasattr(parameter, "quant_state"):  # bitsandbytes' NF4 keeps its scales beside the weight, not in it
            raise ConfigError("blocks_to_swap can't be used with quantize_base nf4: choose int8 or none")
        parts, subclass = _parts(parameter)
        placed = []
        for part_name, part in parts:
            placed.append((part_name, offset, part.dtype, part.shape))
            sources.append((offset, part))
            offset += -(-part.numel() * part.element_size() // _ALIGN) * _ALIGN
        tensors.append(_Tensor(module, name, placed, subclass))
    master = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
    for start, part in sources:
        _view(master, start, part.dtype, part.shape).copy_(part)
    swapped = _Block(tensors, master, [tensor.made_from(master) for tensor in tensors])
    swapped.bind(swapped.at_rest)  # the weights it was loaded with are freed
    return swapped


def blocks_in(denoiser: torch.nn.Module, block_lists: tuple[str, ...]) -> list[torch.nn.Module]:
    """The denoiser's blocks in the order it runs them: those of each of its lists (`Family.swap_blocks`) in turn."""
    return [block for name in block_lists for block in getattr(denoiser, name)]


def most_blocks(blocks: int) -> int:
    """The most blocks that can be swapped: all but the ring's."""
    return max(0, blocks - RING)


def check_count(count: int, blocks: int) -> None:
    """Raise ConfigError, in plain words, for more blocks than can be swapped."""
    if count > most_blocks(blocks):
        raise ConfigError(
            f"blocks_to_swap is {count}, but this base model has {blocks} blocks and {RING} of them must fit on the "
            f"GPU at once: set blocks_to_swap to at most {most_blocks(blocks)}"
        )


def evenly_spaced(blocks: int, count: int) -> list[int]:
    """Which of `blocks` blocks to swap: spread out, so that each copy overlaps the compute of the blocks kept on the
    GPU between them (musubi-tuner's choice)."""
    return sorted({(2 * i + 1) * blocks // (2 * count) for i in range(count)}) if count else []


class _Copier:
    """Copies into the slots: on CUDA on a side stream, each copy waiting for what the GPU was given to compute before
    it (the slot's previous block included) and each block's compute waiting for its copy, the CPU never waiting; on
    the CPU at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def copy(self, slot: torch.Tensor, master: torch.Tensor) -> torch.cuda.Event | None:
        if not self.cuda:
            slot[: master.numel()].copy_(master)
            return None
        computed = torch.cuda.current_stream(slot.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(computed)
            slot[: master.numel()].copy_(master, non_blocking=True)
            return self.stream.record_event()

    def wait(self, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            torch.cuda.current_stream().wait_event(copied)


class BlockStreamer:
    """The swapped blocks of one denoiser, streamed through a ring of slots (see the module's docstring). Made by
    `swap_blocks`; `loads` counts the copies into slots, for tests and logs."""

    def __init__(self, denoiser: torch.nn.Module, blocks: list[torch.nn.Module], swapped: list[int], device):
        self.device = torch.device(device)
        self.blocks = blocks
        pin = self.device.type == "cuda"
        self.swapped = {index: _packed(blocks[index], pin) for index in swapped}
        self.order = sorted(self.swapped)  # the swapped blocks in the order they run
        largest = max(block.nbytes for block in self.swapped.values())
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=self.device) for _ in range(RING)]
        self.holder: list[int | None] = [None] * RING  # which swapped block each slot holds
        self.used = [0] * RING  # when each slot's block last ran (for the least recently used)
        self.copied: dict[int, torch.cuda.Event | None] = {}  # each block in a slot: its copy's event
        self.clock = self.loads = 0
        self._copier = _Copier(self.device)
        self._handles = [
            block.register_forward_pre_hook(self._before(index)) for index, block in enumerate(self.blocks)
        ]
        self._guard_moves(denoiser)

    @property
    def pinned_bytes(self) -> int:
        return sum(block.nbytes for block in self.swapped.values())

    def _before(self, index: int):
        def hook(module: torch.nn.Module, args: object) -> None:
            self.arrive(index)

        return hook

    def arrive(self, index: int) -> None:
        """Block `index` is about to run: its weights in a slot and bound there (copied now if no prefetch brought
        them), and the next swapped blocks in the direction of the pass on their way."""
        backward = torch._C._current_graph_task_id() != -1  # a checkpointed block recomputed during backward
        wanted = ([index] if index in self.swapped else []) + self._ahead(index, backward)
        for each in wanted:
            self._load(each, keep=wanted)
        if index in self.swapped:
            slot = self.holder.index(index)
            self.clock += 1
            self.used[slot] = self.clock
            self._copier.wait(self.copied[index])
            block = self.swapped[index]
            if slot not in block.in_slot:
                block.in_slot[slot] = [tensor.made_from(self.slots[slot]) for tensor in block.tensors]
            block.bind(block.in_slot[slot])

    def _ahead(self, index: int, backward: bool) -> list[int]:
        """The swapped blocks to bring next: the following ones in the pass's direction, wrapping around to the first
        ones after the last only when nothing trains (the next pass is a forward one: a sampler's next step)."""
        room = RING - (index in self.swapped)
        if backward:
            ahead = [each for each in reversed(self.order) if each < index]
        else:
            ahead = [each for each in self.order if each > index]
            if not torch.is_grad_enabled():
                ahead += [each for each in self.order if each < index]
        return ahead[:room]

    def _load(self, index: int, keep: list[int]) -> None:
        if index in self.holder:
            return
        free = [slot for slot, held in enumerate(self.holder) if held not in keep]
        slot = min(free, key=lambda slot: (self.holder[slot] is not None, self.used[slot]))
        leaving = self.holder[slot]
        if leaving is not None:  # back to its master copy: nothing to copy, the base is frozen
            self.swapped[leaving].bind(self.swapped[leaving].at_rest)
            del self.copied[leaving]
        block = self.swapped[index]
        self.copied[index] = self._copier.copy(self.slots[slot], block.master)
        self.holder[slot], self.used[slot] = index, self.clock
        self.loads += 1

    def _guard_moves(self, denoiser: torch.nn.Module) -> None:
        """Moving the denoiser (`.to(device)`, as accelerate, the pipeline and `devices.Offload` do) moves everything
        but the swapped weights, which stay in their master copies and slots."""
        move = denoiser._apply

        def apply_around_swapped(fn, *args, **kwargs):
            with self._set_aside():
                return move(fn, *args, **kwargs)

        denoiser._apply = apply_around_swapped

    @contextmanager
    def _set_aside(self) -> Iterator[None]:
        bound = {index: [getattr(t.module, t.name) for t in block.tensors] for index, block in self.swapped.items()}
        for block in self.swapped.values():
            for tensor in block.tensors:
                tensor.module._parameters[tensor.name] = None  # what `Module._apply` leaves alone
        try:
            yield
        finally:
            for index, block in self.swapped.items():
                block.bind(bound[index])


def swap_blocks(denoiser: torch.nn.Module, block_lists: tuple[str, ...], count: int, device) -> BlockStreamer | None:
    """Swap `count` of the denoiser's blocks (evenly spaced) through a ring of slots on `device`; None for 0. Raises
    ConfigError for more than `most_blocks`. The denoiser's frozen weights are in CPU memory when this is called:
    the swapped ones never leave it whole again."""
    if count == 0:
        return None
    blocks = blocks_in(denoiser, block_lists)
    check_count(count, len(blocks))
    streamer = BlockStreamer(denoiser, blocks, evenly_spaced(len(blocks), count), device)
    log.info(
        "Block swap: %d of the %d blocks stream from %.2f GB of %s CPU memory through %d slots of %.2f GB",
        count,
        len(blocks),
        streamer.pinned_bytes / 2**30,
        "pinned" if streamer.device.type == "cuda" else "plain",
        RING,
        streamer.slots[0].numel() / 2**30,
    )
    return streamer


def count_for_budget(denoiser: torch.nn.Module, block_lists: tuple[str, ...], budget: float) -> int:
    """The fewest blocks to swap for the denoiser's weights on the GPU (those kept there and the slots) to fit in
    `budget` bytes; the most there can be where none fits."""
    from lora_gui.quantization import stored_bytes

    blocks = blocks_in(denoiser, block_lists)
    sizes = [stored_bytes(block) for block in blocks]
    whole = stored_bytes(denoiser)
    for count in range(most_blocks(len(blocks)) + 1):
        chosen = evenly_spaced(len(blocks), count)
        slots = RING * max((sizes[index] for index in chosen), default=0)
        if whole - sum(sizes[index] for index in chosen) + slots <= budget:
            return count
    return most_blocks(len(blocks))
