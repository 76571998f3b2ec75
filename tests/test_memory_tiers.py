"""Memory tiers: a frozen base stored in fewer bits (quantize_base), the presets made for each card size,
and the Train tab's estimate naming the preset that fits the card."""

from __future__ import annotations

import html
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.pipes import fresh_pipe, image
from helpers.runs import quick_config
from safetensors.torch import load_file
from torchao.quantization import Int8Tensor

from lora_gui import events
from lora_gui.config import TrainConfig, load_preset
from lora_gui.errors import ConfigError, LoraGuiError
from lora_gui.estimate import estimate, presets_that_fit, swappable_blocks
from lora_gui.training import checkpoints, train


def first_loss(run) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.train
def test_an_int8_base_trains_a_lora_that_works_on_the_exact_base(tiny_models, photos, tmp_path, monkeypatch):
    model = tiny_models("flux")
    looked = {}
    real_save = checkpoints.save_diffusers_lora

    def save_and_look(target, pipe, family):
        if target.parent.name == "int8":  # the final file, not a checkpoint's
            layer = family.denoiser(pipe).transformer_blocks[0].attn.to_q
            looked["base weight"] = layer.base_layer.weight
            looked["lora weight"] = layer.lora_A["default"].weight
            looked["image"] = image(pipe)
        return real_save(target, pipe, family)

    monkeypatch.setattr(checkpoints, "save_diffusers_lora", save_and_look)
    train(quick_config(model, photos, quantize_base="int8"), tmp_path / "int8")
    train(quick_config(model, photos), tmp_path / "exact")

    # The frozen layers held int8 weights while training; the LoRA on top of them trained in full precision.
    assert isinstance(looked["base weight"], Int8Tensor)
    assert looked["lora weight"].dtype == torch.float32 and looked["lora weight"].requires_grad
    # Storing the base in 8 bits barely moves the loss: the same first step on both bases agrees closely.
    assert first_loss(tmp_path / "int8") == pytest.approx(first_loss(tmp_path / "exact"), rel=0.02)

    # The LoRA file is an ordinary one: on the exact base it changes the picture at strength 1, not at 0, and
    # gives about the picture the quantized base gave with it.
    base = image(fresh_pipe(model))
    pipe = fresh_pipe(model)
    pipe.load_lora_weights(tmp_path / "int8", adapter_name="mine")
    at_one = image(pipe)
    pipe.set_adapters(["mine"], adapter_weights=[0.0])
    at_zero = image(pipe)
    assert np.abs(at_one - base).max() > 1e-3, "the LoRA changes nothing"
    np.testing.assert_allclose(at_zero, base, atol=1e-5)
    assert np.abs(at_one - looked["image"]).mean() < np.abs(at_one - base).mean()


@pytest.mark.train
def test_a_run_on_an_int8_base_stops_and_resumes_exactly(tiny_models, photos, tmp_path):
    config = quick_config(tiny_models("flux"), photos, quantize_base="int8", max_steps=6, checkpoint_every=3)
    train(config, tmp_path / "straight")
    seen = []
    train(
        config,
        tmp_path / "interrupted",
        on_event=seen.append,
        should_stop=lambda: any(e.kind == events.STEP and e.step >= 3 for e in seen),
    )
    train(config, tmp_path / "interrupted", resume=True)
    straight = load_file(tmp_path / "straight/pytorch_lora_weights.safetensors")
    resumed = load_file(tmp_path / "interrupted/pytorch_lora_weights.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.train
def test_nf4_without_an_nvidia_gpu_is_refused_in_plain_words(tiny_models, photos, tmp_path):
    with pytest.raises(LoraGuiError, match="runs only on an NVIDIA GPU; on this computer choose int8"):
        train(quick_config(tiny_models("flux"), photos, quantize_base="nf4"), tmp_path / "run")
    with pytest.raises(ConfigError, match="quantize_base must be one of none, int8, nf4"):
        TrainConfig(quantize_base="fp4")


@pytest.mark.unit
def test_each_flux_preset_fits_its_card_by_the_estimate():
    twelve = load_preset("flux-dev-12gb")
    assert estimate(twelve, "flux", "bf16").memory_gb < 10, "rank 16 at 512 px: under 10 GB"
    assert estimate(twelve.replace(resolution=1024), "flux", "bf16").memory_gb < 12, "and at 1024 px under 12 GB"
    assert estimate(load_preset("flux-dev-16gb"), "flux", "bf16").memory_gb < 16
    assert estimate(load_preset("flux-dev-24gb"), "flux", "bf16").memory_gb < 24
    # Why the tiers exist: Flux.1's transformer alone is 22 GiB in bf16.
    exact = estimate(twelve.replace(quantize_base="none"), "flux", "bf16")
    int8 = estimate(twelve.replace(quantize_base="int8"), "flux", "bf16")
    assert exact.memory_gb > 24
    assert exact.training_gb - int8.training_gb == pytest.approx(11, abs=1.5), "int8 saves a byte per weight"
    assert "stored 4-bit (NF4, bitsandbytes)" in estimate(twelve, "flux", "bf16").notes


@pytest.mark.unit
def test_each_zimage_preset_fits_its_card_by_the_estimate_at_1024_px_and_rank_16():
    twelve, sixteen = load_preset("zimage-12gb"), load_preset("zimage-16gb")
    for preset, card_gb in ((twelve, 12), (sixteen, 16)):
        assert (preset.resolution, preset.rank) == (1024, 16)
        for precision in ("bf16", "fp16"):
            assert estimate(preset, "zimage", precision).memory_gb < card_gb, (card_gb, precision)
    # Why the tiers exist: the 6.2 B-parameter transformer is 11.5 GiB in bf16, and previews decode beside it.
    exact = estimate(twelve.replace(quantize_base="none"), "zimage", "bf16")
    assert exact.memory_gb > 16
    assert exact.training_gb - estimate(twelve, "zimage", "bf16").training_gb == pytest.approx(5.7, abs=0.5)
    # Qwen3-4B encodes the captions alone, then leaves the GPU before the transformer comes.
    assert 7 < estimate(twelve, "zimage", "bf16").caching_gb < 9
    # Its time: a picture's step at 1024 px is 2 x 6.2 B weights x 4,608 tokens (the picture's 4,096, a caption's 512)
    # forward, 113 TFLOP with backward's input gradients, and attention's on top.
    assert 120 < estimate(twelve, "zimage", "bf16", matmul_tflops=400).step_tflop < 160
    assert [name for name, _ in presets_that_fit("zimage", "bf16", 16)] == ["zimage-16gb", "zimage-12gb"]
    assert presets_that_fit("zimage", "bf16", 8) == []


@pytest.mark.train
def test_the_preset_that_fits_the_card_is_named(monkeypatch, tmp_path):
    from lora_gui.jobs import JobManager
    from lora_gui.ui import config_form
    from lora_gui.ui.app import build_app
    from lora_gui.ui.train_tab import show_estimate

    assert [name for name, _ in presets_that_fit("flux", "bf16", 16)] == ["flux-dev-16gb", "flux-dev-12gb"]
    # On 8 GB, T5 (9.1 GB) encodes with its layers streamed: the 12 GB preset's 8 GB there are training's.
    assert [name for name, _ in presets_that_fit("flux", "bf16", 8)] == ["flux-dev-12gb"]
    assert all(name.startswith("sdxl") for name, _ in presets_that_fit("sdxl", "bf16", 12))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=12 * 2**30))
    _, ctx = build_app(tmp_path, JobManager())
    monkeypatch.setattr(ctx.engine, "gpu_tflops", lambda: None)  # the time is another test's: memory alone here
    settings = {**config_form.widget_values(TrainConfig(resolution=1024)), "family": "flux"}
    too_big = html.unescape(show_estimate(ctx, base_model="someone/a-flux-model", **settings)["estimate"])
    assert "That is more than this GPU's 12 GB: pick the flux-dev-12gb preset (≈ 9.5 GB), or " in too_big
    assert "set Quantize base to int8 or nf4" in too_big
    preset = {**config_form.widget_values(load_preset("flux-dev-12gb")), "family": "flux"}
    fits = html.unescape(show_estimate(ctx, base_model="someone/a-flux-model", **preset)["estimate"])
    assert "Of the presets for Flux.1, flux-dev-12gb makes the most of this 12 GB GPU (≈ 9.5 GB)." in fits


@pytest.mark.train
def test_a_single_file_flux_loads_with_an_int8_transformer_and_nf4_is_refused_before_loading(
    tiny_models, tmp_path, download_cache
):
    """diffusers' `from_single_file` takes a file's weights as already quantized: ours quantizes them itself."""
    from helpers.flux_files import bfl_checkpoint
    from helpers.hub import in_download_cache

    from lora_gui.base_models import load_pipeline

    model = tiny_models("flux")
    in_download_cache(download_cache, "black-forest-labs/FLUX.1-dev", model)
    path = bfl_checkpoint(fresh_pipe(model).transformer, tmp_path / "flux1-dev.safetensors")
    _, pipe = load_pipeline(str(path), quantize="int8")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert not isinstance(pipe.vae.encoder.conv_in.weight, Int8Tensor), "only the denoiser is quantized"
    with pytest.raises(ConfigError, match="nf4 can't be used with a single-file checkpoint: choose int8"):
        load_pipeline(str(path), quantize="nf4")


@pytest.mark.unit
def test_generate_stores_the_denoiser_in_as_few_bits_as_the_card_needs_and_no_fewer():
    from lora_gui.estimate import denoiser_parameters
    from lora_gui.quantization import for_card

    flux = denoiser_parameters("flux")
    assert 11.5e9 < flux < 12.5e9, "Flux.1's transformer: 11.9 billion parameters"
    on_a_gpu = dict(on_cuda=True, single_file=False)
    chosen = [for_card(flux, torch.bfloat16, card_gb, **on_a_gpu) for card_gb in (80, 24, 16, 12)]
    assert chosen == ["none", "int8", "int8", "nf4"]
    assert for_card(denoiser_parameters("sdxl"), torch.bfloat16, 8, **on_a_gpu) == "none", "SDXL's UNet fits 8 GB"


@pytest.mark.unit
def test_each_flux2_klein_preset_fits_its_card_by_the_estimate_and_9b_is_sized_as_9b():
    four = load_preset("flux2-klein-12gb")
    assert four.resolution == 1024 and four.rank == 16
    assert estimate(four, "flux2-klein", "bf16").memory_gb < 12
    assert estimate(four, "flux2-klein", "fp16").memory_gb < 12
    nine = load_preset("flux2-klein-9b-24gb")
    assert nine.resolution == 1024 and nine.rank == 16
    assert estimate(nine, "flux2-klein", "bf16").memory_gb < 24
    # The same settings on the 4B: its transformer and Qwen3-4B are less than half the 9B's and Qwen3-8B's.
    as_four = estimate(nine.replace(base_model="black-forest-labs/FLUX.2-klein-base-4B"), "flux2-klein", "bf16")
    as_nine = estimate(nine, "flux2-klein", "bf16")
    assert as_nine.caching_gb - as_four.caching_gb == pytest.approx((8.19e9 - 4.02e9) * 2 / 2**30, abs=0.1)
    assert as_nine.training_gb - as_four.training_gb > 9, "5.2 B more transformer parameters in bf16"
    assert [name for name, _ in presets_that_fit("flux2-klein", "bf16", 24)] == [
        "flux2-klein-9b-24gb",
        "flux2-klein-12gb",
    ]
    assert [name for name, _ in presets_that_fit("flux2-klein", "bf16", 12)] == ["flux2-klein-12gb"]


@pytest.mark.unit
def test_block_swap_lowers_the_estimate_by_the_swapped_blocks_bytes_as_the_base_stores_them():
    preset = load_preset("flux-dev-12gb").replace(quantize_base="none")
    whole = estimate(preset, "flux", "bf16")
    swapped = estimate(preset.replace(blocks_to_swap=20), "flux", "bf16")
    # 20 of Flux.1's 57 blocks evenly spaced: 7 of its 19 double-stream blocks (339.8 M parameters each) and 13 of
    # its 38 single-stream ones (141.6 M), less the ring of two double-stream blocks' slots, in bf16.
    saved = (7 * 339_831_296 + 13 * 141_591_808 - 2 * 339_831_296) * 2 / 2**30
    assert whole.training_gb - swapped.training_gb == pytest.approx(saved, abs=0.01)
    assert whole.previews_gb - swapped.previews_gb == pytest.approx(saved, abs=0.01), "previews use the same blocks"
    assert "Block swap: 20 of the 57 blocks wait in the computer's memory (7.9 GB of it)" in swapped.notes
    # A base stored in 8 bits swaps about half the bytes.
    int8 = preset.replace(quantize_base="int8")
    int8_swapped = estimate(int8.replace(blocks_to_swap=20), "flux", "bf16")
    assert estimate(int8, "flux", "bf16").training_gb - int8_swapped.training_gb == pytest.approx(saved / 2, rel=0.05)
    assert estimate(preset.replace(blocks_to_swap=57), "flux", "bf16").training_gb < swapped.training_gb
    # Text encoders that don't fit the card whole encode with their layers streamed: T5's 9.1 GB on an 8 GB card.
    on_eight = estimate(preset, "flux", "bf16", card_gb=8)
    assert on_eight.caching_gb < 3 < whole.caching_gb == estimate(preset, "flux", "bf16", card_gb=24).caching_gb
    assert "encode the captions once with their layers streamed from the computer's memory" in on_eight.notes
    # A UNet's blocks don't swap (the setting changes nothing there); every block of Flux.1's can.
    assert swappable_blocks(TrainConfig(), "sdxl") == 0 and swappable_blocks(TrainConfig(), "flux") == 57


@pytest.mark.unit
def test_a_text_encoder_that_does_not_fit_encodes_the_same_with_its_layers_streamed():
    from lora_gui import tiny
    from lora_gui.devices import Offload

    torch.manual_seed(0)
    (_, t5), (_, qwen) = tiny.t5_text_parts("tiny"), tiny.qwen3_text_parts("qwen3-4b", "tiny")
    t5.eval(), qwen.eval()  # as frozen encoders encode: T5's dropout off
    ids = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        expected = [t5(ids).last_hidden_state, qwen.model(ids).last_hidden_state]
    resting = {id(p): p.data_ptr() for p in (*t5.parameters(), *qwen.parameters())}
    brought = []
    offload = Offload(torch.device("cpu"), room=0)  # neither fits: both stream
    with torch.no_grad(), offload.borrowed(t5, qwen):
        assert not offload.on_device
        embeddings = t5.shared.weight, qwen.model.embed_tokens.weight
        assert all(weight.data_ptr() != resting[id(weight)] for weight in embeddings), "the rest came whole"
        for layer in (*t5.encoder.block, *qwen.model.layers):  # while a layer computes, its weights are a copy
            layer.register_forward_pre_hook(
                lambda layer, args: brought.append(all(p.data_ptr() != resting[id(p)] for p in layer.parameters()))
            )
        streamed = [t5(ids).last_hidden_state, qwen.model(ids).last_hidden_state]
    assert brought == [True] * (len(t5.encoder.block) + len(qwen.model.layers))
    for got, want in zip(streamed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Afterwards every weight is its own again, in CPU memory: nothing was copied back. With room, nothing streams.
    assert all(p.data_ptr() == resting[id(p)] for p in (*t5.parameters(), *qwen.parameters()))
    with Offload(torch.device("cpu")).borrowed(t5, qwen):
        assert all(p.data_ptr() == resting[id(p)] for p in t5.parameters())


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "family", "card_gb", "swapped"),
    [
        ("chroma-12gb", "chroma", 12, 0),
        ("qwen-image-24gb", "qwen-image", 24, 16),
        ("qwen-image-16gb", "qwen-image", 16, 36),
        ("flux2-dev-24gb", "flux2-dev", 24, 36),
    ],
)
def test_each_preset_of_the_largest_families_fits_its_card_and_swaps_blocks_only_where_8_bits_do_not_fit(
    name, family, card_gb, swapped
):
    """Issue 29's presets at 1024 px and rank 16, on bf16 and fp16-only cards: Chroma's 8.9 B fit 12 GB in 4 bits;
    Qwen-Image's 20 B and Flux.2 dev's 32 B don't fit their cards even in 8 bits, and fit with the blocks they keep
    in the computer's memory (block swap), exactly as musubi-tuner's published recipe for Qwen-Image on 24 GB."""
    preset = load_preset(name)
    assert (preset.resolution, preset.rank, preset.blocks_to_swap) == (1024, 16, swapped)
    for precision in ("bf16", "fp16"):
        assert estimate(preset, family, precision, card_gb=card_gb).memory_gb < card_gb, precision
    if swapped:
        unswapped = estimate(preset.replace(blocks_to_swap=0), family, "bf16", card_gb=card_gb)
        assert unswapped.memory_gb > card_gb, "block swap only where the 8-bit base alone does not fit"
    assert name in [fitting for fitting, _ in presets_that_fit(family, "bf16", card_gb)]
