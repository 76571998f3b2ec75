"""Right on every card people own: 8 to 80 GB, computing bf16 or only fp16 (T4, V100, RTX 20xx).

Each test puts a card under the engine (conftest's `card`: its memory and precision, on the CPU's kernels), so the
engine takes the very branches that card takes: the precision, the quantization Generate picks, whether the pipeline
offloads its parts, the text encoders' dtypes. Where the CPU can't show what a GPU does (bitsandbytes' NF4 runs only
on CUDA; a second device for the offload hook), the test checks the library behaviour the engine depends on instead,
and says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from helpers.app import generate_request
from helpers.flux_files import bfl_checkpoint
from helpers.hub import in_download_cache
from helpers.pipes import fresh_pipe
from helpers.runs import quick_config
from PIL import Image
from torchao.quantization import Int8Tensor

from lora_gui import base_models, devices, events, infer, model_policy, quantization
from lora_gui.config import load_preset
from lora_gui.estimate import denoiser_parameters, estimate
from lora_gui.families import REGISTRY
from lora_gui.infer import Generator
from lora_gui.training import train


def varied(image: Image.Image) -> bool:
    """A picture with something in it: not one flat colour (NaN latents decode to a black picture)."""
    return float(np.asarray(image, dtype=np.float32).std()) > 1.0


def is_int8(module: torch.nn.Module) -> bool:
    return any(isinstance(p, Int8Tensor) for p in module.parameters())


# ---- decoding where the offload hook runs the VAE -------------------------------------------------------------------
@pytest.mark.train
def test_decode_hands_the_latents_to_the_device_the_offload_hook_moves_the_vae_to(tiny_models, card, monkeypatch):
    """With model CPU offload (Flux under ~42 GB, SDXL on 8 GB) the VAE waits in CPU memory, and diffusers' hook moves
    it to the GPU when it decodes, but not its input. The CPU has no second device, so the hook's device is the meta
    device here, a stand-in: the latents must arrive there, not on the CPU where the VAE waited."""
    card(12, posing_as="flux")
    generator = Generator.load(str(tiny_models("flux")), quantize="none")
    vae = generator.pipe.vae
    assert vae._hf_hook.execution_device is not None, "a 12 GB card offloads Flux"
    vae._hf_hook.execution_device = torch.device("meta")
    seen = []

    def decode(self, latents, *args, **kwargs):  # in place of the hooked decode: what reaches it, and where
        seen.append(latents.device)
        return (torch.zeros(latents.shape[0], 3, 64, 64),)

    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    latents = torch.randn(1, (64 // 16) ** 2, 64)  # Flux's packed latents of a 64 px picture
    infer.decode(generator.family, generator.pipe, latents, 64, 64)
    assert seen == [torch.device("meta")]


# ---- int8 in fp16 ----------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_an_int8_base_stays_finite_in_fp16_where_torchaos_per_row_layer_overflows():
    """torchao's per-row int8 layer multiplies by the raw int8 weights before scaling: at Flux's width, in fp16, its
    outputs overflow (the library behaviour, shown here); the engine's int8 in fp16 unpacks groups first and stays
    finite, and its outputs are the exact layer's within int8's error. bf16 keeps the faster per-row layer."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    exact = torch.nn.Linear(3072, 3072).half()
    activations = torch.randn(64, 3072).half() * 30  # Flux's hidden states reach tens to hundreds
    expected = exact(activations).float()
    assert torch.isfinite(expected).all()

    per_row = torch.nn.Sequential(torch.nn.Linear(3072, 3072).half())
    per_row[0].load_state_dict(exact.state_dict())
    quantize_(per_row, Int8WeightOnlyConfig())
    assert not torch.isfinite(per_row(activations)).all(), "torchao's per-row int8 overflows in fp16"

    ours = torch.nn.Sequential(torch.nn.Linear(3072, 3072).half())
    ours[0].load_state_dict(exact.state_dict())
    quantization.quantize_loaded(ours, "int8", torch.float16)
    result = ours(activations).float()
    assert torch.isfinite(result).all()
    assert (result - expected).abs().mean() < 0.02 * expected.abs().mean()

    bf16 = torch.nn.Sequential(torch.nn.Linear(3072, 3072).bfloat16())
    quantization.quantize_loaded(bf16, "int8", torch.bfloat16)
    assert bf16[0].weight.block_size[-1] == 3072, "bf16 keeps one scale per row"


@pytest.mark.train
def test_an_int8_flux_trains_previews_and_generates_on_a_card_without_bf16(tiny_models, photos, tmp_path, card):
    """The 16 and 24 GB Flux presets on a T4 or V100: auto precision is fp16, the base int8."""
    card(16, bf16=False)
    received = []
    config = quick_config(tiny_models("flux"), photos, max_steps=2, sample_every=2, quantize_base="int8")
    train(config, tmp_path / "run", on_event=received.append)
    assert next(e for e in received if e.kind == events.STARTED).data["precision"] == "fp16"
    losses = [e.data["loss"] for e in received if e.kind == events.STEP]
    assert len(losses) == 2 and np.isfinite(losses).all()
    samples = next(e for e in received if e.kind == events.SAMPLES).data["paths"]
    assert all(varied(Image.open(path)) for path in samples)
    generator = Generator.load(config.base_model, quantize="int8")
    assert is_int8(generator.pipe.transformer) and generator.precision == "fp16"
    generator.set_loras([(tmp_path / "run", 1.0)])
    assert varied(generator("a red circle", steps=2, width=64, height=64))


# ---- Generate's quantization: a setting, and an automatic choice that can load -------------------------------------
@pytest.mark.train
def test_generates_automatic_quantization_never_picks_what_the_models_format_refuses(
    tiny_models, tmp_path, download_cache, card
):
    """A single-file Flux on a 12 GB card: NF4 would fit, but a single file can't be loaded in NF4 (diffusers reads
    a file's weights as already quantized): int8, and the parts brought to the GPU in turn."""
    flux = denoiser_parameters("flux")
    assert quantization.for_card(flux, torch.bfloat16, 12, on_cuda=True, single_file=False) == "nf4"
    assert quantization.for_card(flux, torch.bfloat16, 12, on_cuda=True, single_file=True) == "int8"
    assert quantization.for_card(flux, torch.bfloat16, 12, on_cuda=False, single_file=False) == "int8"

    model = tiny_models("flux")
    in_download_cache(download_cache, "black-forest-labs/FLUX.1-dev", model)
    path = bfl_checkpoint(fresh_pipe(model).transformer, tmp_path / "flux1-dev.safetensors")
    card(12, posing_as="flux")
    generator = Generator.load(str(path))
    assert is_int8(generator.pipe.transformer)
    assert generator.pipe.transformer._hf_hook is not None, "the parts come to the GPU in turn"
    assert varied(generator("a red circle", steps=2, width=64, height=64))


@pytest.mark.train
def test_generate_takes_a_quantization_in_the_page_and_on_the_command_line(tiny_models, photos, tmp_path, monkeypatch):
    from lora_gui.cli import main
    from lora_gui.jobs import JobManager
    from lora_gui.owners import EVERYONE
    from lora_gui.ui.app import build_app
    from lora_gui.ui.generate import generate

    model = tiny_models("flux")
    lora = train(quick_config(model, photos, max_steps=1), tmp_path / "run")
    loaded = []
    real_load = Generator.load.__func__

    def load(cls, *args, **kwargs):
        generator = real_load(cls, *args, **kwargs)
        loaded.append(is_int8(generator.pipe.transformer))
        return generator

    monkeypatch.setattr(Generator, "load", classmethod(load))
    _, ctx = build_app(tmp_path / "runs", JobManager())
    request = generate_request(model, lora)
    result = generate(ctx, EVERYONE, **request, gen_quantize="int8")
    assert "Made with" in result["gen_notice"], result
    assert loaded == [True]
    refused = generate(ctx, EVERYONE, **request, gen_quantize="fp4")["gen_notice"]
    assert "Store the model in fewer bits must be one of auto, none, int8, nf4" in refused
    nf4 = generate(ctx, EVERYONE, **request, gen_quantize="nf4")["gen_notice"]
    assert "runs only on an NVIDIA GPU" in nf4, "a sentence, not a traceback"

    output = tmp_path / "picture.png"
    argv = ["generate", "--base-model", str(model), "--prompt", "a red circle", "--output", str(output)]
    assert (
        main([*argv, "--lora", str(lora), "--steps", "1", "--width", "64", "--height", "64", "--quantize", "int8"]) == 0
    )
    assert loaded[-1] is True and output.is_file()


# ---- the prompt read as training read the captions -----------------------------------------------------------------
@pytest.mark.train
def test_flux_prompts_are_encoded_with_t5s_fp32_layers_in_fp32_as_training_encodes_captions(
    tiny_models, photos, tmp_path, card, monkeypatch
):
    """transformers keeps T5's `wo` layers in fp32 when T5 loads in fp16; fp16 autocast would compute them in fp16.
    Training encodes captions without autocast: previews and Generate must read their prompts the same way."""
    from lora_gui.training import setup

    card(24, bf16=False)
    computed = []  # each wo layer's call: its input's dtype, its weight's, whether autocast was on
    real_load = base_models.load_pipeline

    def loading_and_watching_wo(*args, **kwargs):
        family, pipe = real_load(*args, **kwargs)
        for name, module in pipe.text_encoder_2.named_modules():
            if name.endswith(".wo"):
                module.register_forward_pre_hook(
                    lambda module, args: computed.append(
                        (args[0].dtype, module.weight.dtype, torch.is_autocast_enabled("cpu"))
                    )
                )
        return family, pipe

    for module in (setup, infer):
        monkeypatch.setattr(module, "load_pipeline", loading_and_watching_wo)
    config = quick_config(tiny_models("flux"), photos, max_steps=1, sample_every=1)
    train(config, tmp_path / "run")
    training = list(computed)
    computed.clear()
    Generator.load(config.base_model)("a red circle", steps=1, width=64, height=64)
    assert training and computed, "T5 read the captions, the preview prompt and Generate's prompt"
    assert all(weight == torch.float32 for _, weight, _ in training + computed), "the wo layers loaded in fp32"
    assert all(x == torch.float32 and not autocast for x, _, autocast in training + computed), training + computed


# ---- the choice made from the model's own files ------------------------------------------------------------------
@pytest.mark.train
def test_a_hub_flux_fine_tune_is_quantized_for_the_card_after_its_download(
    tiny_models, download_cache, card, monkeypatch
):
    """Not yet downloaded, a fine-tune's family can't be told from its name: the choice waits for its files, and a
    24 GB card gets int8 (unquantized, Flux's 22 GB transformer runs out of memory on it, and so did every retry)."""
    model = tiny_models("flux")
    repo = "someone/flux-portrait-finetune"
    monkeypatch.setattr(base_models.constants, "HF_HUB_OFFLINE", False)
    fetched = []

    def download(repo_id, token=None, on_progress=None, **kwargs):
        if not fetched:
            in_download_cache(download_cache, repo_id, model)
        fetched.append(repo_id)

    monkeypatch.setattr(base_models, "download", download)
    assert base_models.family_from_files(repo) is None, "nothing tells its family before the download"
    card(24, posing_as="flux")
    generator = Generator.load(repo)
    assert fetched[0] == repo and is_int8(generator.pipe.transformer)


@pytest.mark.train
def test_generate_sizes_a_model_by_its_own_files_not_its_familys_published_size(tiny_models, card):
    """The tiny Flux's transformer is a few MB: no card needs it quantized, though Flux.1's would be on 12 GB."""
    model = tiny_models("flux")
    own = base_models.denoiser_parameters_on_disk(str(model))
    assert own == sum(p.numel() for p in fresh_pipe(model).transformer.parameters())
    card(12)
    generator = Generator.load(str(model))
    assert not is_int8(generator.pipe.transformer)
    assert getattr(generator.pipe.transformer, "_hf_hook", None) is None, "it fits whole"


# ---- memory counted as allocated ------------------------------------------------------------------------------------
@pytest.mark.train
def test_quantized_weights_are_counted_at_the_bytes_they_store(tiny_models):
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False).bfloat16())
    assert quantization.stored_bytes(layer) == 256 * 256 * 2
    quantization.quantize_loaded(layer, "int8", torch.bfloat16)
    assert 1 < quantization.stored_bytes(layer) / (256 * 256) < 1.1, "a byte per weight, and a scale per row"
    assert sum(p.numel() * p.element_size() for p in layer.parameters()) == 256 * 256 * 2, "what was counted before"


@pytest.mark.unit
def test_the_estimate_counts_t5s_fp32_layers_under_fp16():
    """The 12 GB Flux preset's caching phase: T5's `wo` layers (1 billion weights) take 4 bytes in fp16, not 2."""
    preset = load_preset("flux-dev-12gb")
    bf16, fp16 = estimate(preset, "flux", "bf16"), estimate(preset, "flux", "fp16")
    assert fp16.caching_gb - bf16.caching_gb == pytest.approx(1.9, abs=0.1)
    assert fp16.memory_gb < 12, "the preset still fits its card without bf16"


# ---- the card matrix ------------------------------------------------------------------------------------------------
CARD_SIZES = (8, 12, 16, 24, 48, 80)
# What Generate does with each family's published model on each card (bf16 ones; fp16-only cards choose alike but
# where a (size, "fp16") entry says otherwise):
# the denoiser's quantization as a CUDA card picks it, and whether the pipeline brings its parts to the GPU in turn.
GENERATE_PLANS = {
    "sd15": {size: ("none", False) for size in CARD_SIZES},
    "sd2": {size: ("none", False) for size in CARD_SIZES},
    "sdxl": {8: ("none", True), **{size: ("none", False) for size in CARD_SIZES[1:]}},
    "flux": {
        8: ("nf4", True),
        12: ("nf4", True),
        16: ("int8", True),
        24: ("int8", True),
        48: ("none", False),
        80: ("none", False),
    },
    # klein 4B: its 3.9 B transformer in int8 on 8 GB, whole above; with Qwen3-4B the pipeline is 16 GB in bf16.
    "flux2-klein": {
        8: ("int8", True),
        12: ("none", True),
        16: ("none", True),
        24: ("none", False),
        48: ("none", False),
        80: ("none", False),
    },
    # Qwen-Image: its 20.4 B-parameter transformer is 41 GB in bf16, and Qwen2.5-VL-7B beside it 16.6 GB more.
    "qwen-image": {
        8: ("nf4", True),
        12: ("nf4", True),
        16: ("nf4", True),
        24: ("nf4", True),
        48: ("int8", True),
        80: ("none", False),
    },
    # Z-Image: its 6.2 B-parameter transformer is 12.3 GB in bf16, and Qwen3-4B beside it 8 GB more.
    "zimage": {
        8: ("int8", True),
        (8, "fp16"): ("nf4", True),  # fp16's int8 is scaled per group: 6.2 B weights then take more than 6 GB
        12: ("int8", True),
        16: ("none", True),
        24: ("none", True),
        48: ("none", False),
        80: ("none", False),
    },
    # Chroma: its 8.9 B transformer is 17.8 GB in bf16 (whole on 24 GB cards, int8 on 12 and 16), and T5-XXL beside
    # it 9.5 GB more: on the GPU whole from 48 GB.
    "chroma": {
        8: ("nf4", True),
        12: ("int8", True),
        16: ("int8", True),
        24: ("none", True),
        48: ("none", False),
        80: ("none", False),
    },
}


# The smallest card a family's LoRA trains on by Suggest settings, where it is not 12 GB: Qwen-Image's 20 B transformer
# needs 15.8 GB with every memory saver but block swap.
SMALLEST_CARD_TRAINED = {"qwen-image": 24}
# Families whose card rows wait for block swap (issue 29), which changes what Suggest settings gives them on small
# cards: Qwen-Image's rows pass as they are (measured: 170 s of a loaded 2-core machine), past the suite's time budget.
CARD_MATRIX_LATER = ("qwen-image",)


def placed_on_the_gpu_in_turn(pipe) -> bool:
    """Whether diffusers' model CPU offload moves the pipeline's parts to the GPU as each is used."""
    return getattr(pipe.vae, "_hf_hook", None) is not None


@pytest.mark.train
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16-only"])
# Chroma takes Flux.1's paths on every card (the same quantization and offloading; T5 in its dtypes): its row above
# passes (measured), and is left out of the suite's time budget. Flux.2 dev's plans come with block swap. Flux.1
# Kontext is Flux.1 on every card too (its transformer, text encoders and VAE; the picture to edit adds tokens,
# which the estimate counts), its pairs' paths tested in test_edit_pairs.py and test_families.py.
@pytest.mark.parametrize(
    "family", [name for name in REGISTRY if name not in ("chroma", "flux2-dev", "flux-kontext", *CARD_MATRIX_LATER)]
)
def test_every_family_trains_previews_and_generates_on_every_card(tiny_models, photos, tmp_path, card, family, bf16):
    """For each card of 8 to 80 GB: the settings Suggest settings makes for it, trained a few steps with previews
    (finite losses and LoRA, pictures not one flat colour, only the denoiser on the device while it trains), and
    Generate with the quantization and offloading that card gets for the family's published model (the tiny model
    posing as it), in the card's precision, with the text encoders and VAE in the dtypes they must have.

    Cards that lead to the same branches run them once. NF4 (bitsandbytes) runs only on CUDA: where a card would
    get it, the choice is checked as a CUDA card makes it, and the CPU runs int8 in its place, as the engine does
    on a machine without CUDA."""
    from lora_gui import suggest

    precision = "bf16" if bf16 else "fp16"
    model = tiny_models(family)
    trained: dict[tuple, object] = {}
    generated: set[tuple] = set()
    for size in CARD_SIZES:
        gpu = card(size, bf16, posing_as=family)
        assert devices.resolve_precision("auto") == precision

        # Training: Suggest settings' memory savers for this card, on the tiny model.
        try:
            suggested = suggest.suggest(
                suggest.Pictures((512,) * 12, ("a photo of zqx",) * 12), "object", family, suggest.Card.here()
            ).config
        except Exception as error:  # nothing fits: the user is told so, in a sentence
            assert "more than this" in str(error) and size < SMALLEST_CARD_TRAINED.get(family, 12), (size, error)
            suggested = None
        if suggested is not None:
            savers = runnable_here(suggested)
            if savers not in trained:
                trained[savers] = check_training(model, photos, tmp_path / f"run-{size}", savers, precision)

        # Generate: the choice a CUDA card of this size makes, and the branches it takes here.
        plans = GENERATE_PLANS[family]
        expected_quantization, expected_offload = plans.get((size, precision), plans[size])
        chosen = infer._quantization_for_this_card(str(model), "auto", precision, model_policy.ANY_BASE_MODEL)
        on_cuda = quantization.for_card(
            denoiser_parameters(family), devices.DTYPES[precision], gpu.memory_gb, on_cuda=True, single_file=False
        )
        assert on_cuda == expected_quantization, (size, on_cuda)
        assert chosen == (expected_quantization if expected_quantization != "nf4" else "int8"), (size, chosen)
        plan = (chosen, expected_offload)
        if plan in generated:
            continue
        generated.add(plan)
        generator = Generator.load(str(model))
        check_generator(generator, family, precision, chosen, expected_offload, next(iter(trained.values()), None))
    assert trained and generated


def runnable_here(suggested) -> tuple[str, bool, str, float]:
    """A card's memory savers as the CPU can run them: int8 for NF4, AdamW for 8-bit AdamW (bitsandbytes' both need
    CUDA), as (quantize_base, gradient_checkpointing, optimizer, learning_rate)."""
    quantize = "int8" if suggested.quantize_base == "nf4" else suggested.quantize_base
    optimizer = "adamw" if suggested.optimizer == "adamw8bit" else suggested.optimizer
    return quantize, suggested.gradient_checkpointing, optimizer, suggested.learning_rate


def check_training(model, photos, run, savers, precision):
    """Train the tiny model a few steps with a card's memory savers: finite, previews with something in them, the
    denoiser alone on the device for the steps."""
    quantize, checkpointing, optimizer, learning_rate = savers
    config = quick_config(
        model,
        photos,
        max_steps=2,
        sample_every=2,
        quantize_base=quantize,
        gradient_checkpointing=checkpointing,
        optimizer=optimizer,
        learning_rate=learning_rate,
    )
    received = []
    placements = []
    real_step = devices.Offload.bring

    def bring(self, *modules):
        real_step(self, *modules)
        placements.append({type(module).__name__ for module in self.on_device})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devices.Offload, "bring", bring)
        lora = train(config, run, on_event=received.append)
    assert next(e for e in received if e.kind == events.STARTED).data["precision"] == precision
    losses = [e.data["loss"] for e in received if e.kind == events.STEP]
    assert len(losses) == 2 and np.isfinite(losses).all(), losses
    from safetensors.torch import load_file

    assert all(torch.isfinite(tensor).all() for tensor in load_file(lora).values())
    samples = next(e for e in received if e.kind == events.SAMPLES).data["paths"]
    assert samples and all(varied(Image.open(path)) for path in samples)
    # Caching brings the VAE alone, then the frozen text encoders alone; the denoiser comes once they have left.
    vaes = {"AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderKLQwenImage"}
    denoisers = {family.denoiser_class.__name__ for family in REGISTRY.values()}
    assert len(placements[0]) == 1 and placements[0] <= vaes, placements
    assert not placements[1] & vaes and not placements[1] & denoisers, placements
    assert len(next(names for names in placements if names & denoisers)) == 1, placements
    return run


def check_generator(generator, family, precision, quantize, offload, run):
    pipe = generator.pipe
    denoiser = generator.family.denoiser(pipe)
    assert generator.precision == precision
    assert is_int8(denoiser) == (quantize == "int8")
    assert placed_on_the_gpu_in_turn(pipe) == offload
    assert pipe.vae.dtype == torch.float32, "the VAE stays fp32 on every card"
    half = devices.DTYPES[precision]
    for encoder in generator.family.text_encoders(pipe):
        dtypes = {name: p.dtype for name, p in encoder.named_parameters()}
        # transformers keeps T5's wo layers in fp32 under fp16 (they overflow it); every other weight is the card's.
        kept = {name for name in dtypes if ".wo." in name and precision == "fp16"}
        assert all(dtype == (torch.float32 if name in kept else half) for name, dtype in dtypes.items()), family
    if run is not None:
        generator.set_loras([(run, 1.0)])
    assert varied(generator("a red circle", steps=2, width=64, height=64))


@pytest.fixture(autouse=True)
def decodes_in_fp32_outside_autocast(monkeypatch):
    """Every VAE decode of these tests, previews' and Generate's: the latents and the VAE in fp32, autocast off (on a
    GPU the denoiser hands its latents over in bf16 or fp16, and SDXL's VAE overflows in fp16)."""
    seen = []
    real = AutoencoderKL.decode

    def decode(self, latents, *args, **kwargs):
        seen.append((latents.dtype, self.dtype, torch.is_autocast_enabled(latents.device.type)))
        return real(self, latents, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    yield
    assert all(latents == vae == torch.float32 and not autocast for latents, vae, autocast in seen), seen


@pytest.mark.unit
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16-only"])
def test_captioning_runs_in_the_cards_precision_and_on_the_processor_while_a_run_has_it(tmp_path, card, bf16):
    """Florence-2 captions on the card in its half precision (bf16, or fp16 on an older card); while a run holds the
    GPU, captioning goes to the processor."""
    from lora_gui.captioning import load_captioner
    from lora_gui.captioning.florence import write_tiny
    from lora_gui.gpu_owner import GpuOwner

    gpu = card(12, bf16)
    florence = write_tiny(tmp_path / "florence")
    owner = GpuOwner()
    with owner.captioning_turn() as turn:
        assert turn.device == str(gpu.device) and not turn.why
        captioner = load_captioner("florence2-base", source=florence, device=turn.device, max_tokens=8)
        try:
            assert captioner.model.dtype == (torch.bfloat16 if bf16 else torch.float16)
            captions = captioner.caption([Image.new("RGB", (80, 60), "red"), Image.linear_gradient("L")])
            assert len(captions) == 2 and all(caption.strip() for caption in captions)
        finally:
            captioner.close()
    # On a real card the processor's fp32 follows (test_captioning_florence); here the card's device is the CPU too.
    with owner.run_turn(lambda text: None, should_stop=lambda: False), owner.captioning_turn() as turn:
        assert turn.device == "cpu" and "runs on the processor" in turn.why
