"""Block swap (lora_gui/block_swap.py): the swapped blocks streamed through the ring of slots change no number. On the
CPU the slots are CPU buffers and the copies synchronous; the master copies, the re-pointing, the hooks and the
prefetch schedule are the GPU's (scripts/gpu_smoke.py checks the streams and the memory on a GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.runs import quick_config
from safetensors.torch import load_file

from lora_gui import block_swap, events
from lora_gui.demo import write_demo_dataset
from lora_gui.errors import ConfigError
from lora_gui.families import REGISTRY
from lora_gui.infer import Generator
from lora_gui.tiny import write_tiny_model
from lora_gui.training import train

pytestmark = pytest.mark.train

SWAPPED = 4  # of the 6 blocks below: all but the ring's 2


@pytest.fixture
def deeper_tiny_model(tmp_path, monkeypatch):
    """The tiny Z-Image with 4 main layers: 6 blocks with its two refiners, so that 4 are swapped through 2 slots."""
    family = REGISTRY["zimage"]
    monkeypatch.setitem(family.denoiser_shapes, "tiny", {**family.denoiser_shapes["tiny"], "n_layers": 4})
    return write_tiny_model(tmp_path / "model", "zimage")


def swap_watched(monkeypatch) -> list[block_swap.BlockStreamer]:
    """The streamers the engine makes from now on; each checks, as each swapped block runs, that the block computes
    with its slot's weights."""
    made = []
    real = block_swap.swap_blocks

    def watched(*args, **kwargs):
        streamer = real(*args, **kwargs)
        if streamer is not None:
            made.append(streamer)
            for index in streamer.swapped:
                streamer.blocks[index].register_forward_pre_hook(in_a_slot(streamer, index))
        return streamer

    monkeypatch.setattr(block_swap, "swap_blocks", watched)
    return made


def storage(tensor: torch.Tensor) -> int:
    inner = getattr(tensor, "qdata", tensor)  # torchao's int8: its bytes
    return inner.untyped_storage().data_ptr()


def in_a_slot(streamer: block_swap.BlockStreamer, index: int):
    def check(module, args):
        slot = streamer.slots[streamer.holder.index(index)]
        weights = [getattr(t.module, t.name) for t in streamer.swapped[index].tensors]
        assert all(storage(weight) == slot.untyped_storage().data_ptr() for weight in weights)
        streamer.ran = getattr(streamer, "ran", 0) + 1

    return check


def at_rest_unless_in_a_slot(streamer: block_swap.BlockStreamer) -> None:
    """Between uses a swapped block's weights are its master copy's; only the ring's blocks hold slots (and compute
    from them once they run: one brought ahead of its turn is still at rest)."""
    assert sum(held is not None for held in streamer.holder) == block_swap.RING
    for index, block in streamer.swapped.items():
        flats = [block.master, *([streamer.slots[streamer.holder.index(index)]] if index in streamer.holder else [])]
        for tensor in block.tensors:
            assert storage(getattr(tensor.module, tensor.name)) in [flat.untyped_storage().data_ptr() for flat in flats]


def test_block_swap_trains_and_generates_bit_for_bit_as_without(deeper_tiny_model, tmp_path, monkeypatch):
    photos = write_demo_dataset(tmp_path / "photos", count=2, size=(64, 64))
    made = swap_watched(monkeypatch)
    loads, said = [], []

    def on_event(event):
        if event.kind == events.STEP and made:
            loads.append(made[0].loads)
        if event.kind == events.MESSAGE:
            said.append(event.data["text"])

    # A preview at the last step: the forward-only path, wrapping around from the last swapped block to the first.
    common = dict(max_steps=2, batch_size=1, log_every=1, sample_every=2, sample_steps=1, quantize_base="int8")
    plain = quick_config(deeper_tiny_model, photos, gradient_checkpointing=True, **common)
    swapped = quick_config(deeper_tiny_model, photos, blocks_to_swap=SWAPPED, **common)  # checkpointing: off, asked
    train(plain, tmp_path / "plain")
    assert not made
    train(swapped, tmp_path / "swapped", on_event=on_event)

    assert "blocks_to_swap needs gradient_checkpointing: it is on for this run" in said
    assert json.loads((tmp_path / "swapped" / "config.json").read_text())["gradient_checkpointing"]
    losses = [
        [row["loss"] for row in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
        for run in ("plain", "swapped")
    ]
    assert len(losses[1]) == 2 and losses[0] == losses[1]
    previews = [(tmp_path / run / "samples" / "step-2-0.png").read_bytes() for run in ("plain", "swapped")]
    assert previews[0] == previews[1]
    lora = [load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in ("plain", "swapped")]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])
    # The schedule: the first step's forward pass loads every swapped block, its backward pass all but the ring's
    # (the last two stay for it); from then on both passes load all but the ring's (the first two stay too).
    beyond_ring = SWAPPED - block_swap.RING
    assert loads == [SWAPPED + beyond_ring, SWAPPED + 3 * beyond_ring]
    streamer = made[0]
    assert streamer.ran > 0
    at_rest_unless_in_a_slot(streamer)

    generate_swapped_as_without(deeper_tiny_model, tmp_path / "swapped", made, monkeypatch)


def generate_swapped_as_without(model, run, made, monkeypatch) -> None:
    """Generate on a card too small for the denoiser swaps as many blocks as there can be, and makes the picture it
    makes on a card that holds it all, with a LoRA as without."""
    from lora_gui import devices

    pictures = []
    for memory_gb in (80, 1e-4):
        gpu = devices.Card(memory_gb, True, torch.device("cpu"))
        monkeypatch.setattr(devices, "card", lambda gpu=gpu: gpu)
        generator = Generator.load(str(model), quantize="int8")
        generator.set_loras([(run, 1.0)])
        pictures.append(np.asarray(generator("a red circle", seed=1, steps=1, width=64, height=64)))
    assert len(made) == 2 and len(made[1].swapped) == SWAPPED  # the run's, then Generate's
    assert made[1].ran > 0
    np.testing.assert_array_equal(pictures[0], pictures[1])


def test_block_swap_refuses_more_blocks_than_there_can_be_and_a_unet(deeper_tiny_model, tiny_model, tmp_path):
    photos = write_demo_dataset(tmp_path / "photos", count=1, size=(64, 64))
    with pytest.raises(ConfigError) as refused:
        train(quick_config(deeper_tiny_model, photos, blocks_to_swap=5), tmp_path / "too-many")
    assert str(refused.value) == (
        "blocks_to_swap is 5, but this base model has 6 blocks and 2 of them must fit on the GPU at once: set "
        "blocks_to_swap to at most 4"
    )
    # The UNet's backward pass breaks when its blocks are swapped (see Family.swap_blocks).
    with pytest.raises(ConfigError, match=r"blocks_to_swap works with transformer models; this Stable Diffusion 1\.x"):
        train(quick_config(tiny_model, photos, blocks_to_swap=1), tmp_path / "unet")
