"""Issue 30's Generate with a picture to edit: an edit LoRA of a tiny Flux.1 Kontext trained on before/after pairs,
applied by diffusers' own FluxKontextPipeline, by `generate --image` and by the Generate tab."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from helpers.runs import gray_before_pictures, quick_config
from PIL import Image

from lora_gui.cli import main
from lora_gui.config import TrainConfig
from lora_gui.demo import write_demo_dataset
from lora_gui.families import REGISTRY
from lora_gui.infer import Generator
from lora_gui.jobs import JobManager
from lora_gui.owners import EVERYONE
from lora_gui.runs import DIFFUSERS_LORA, RunFolder, TrainingRecord
from lora_gui.training import train
from lora_gui.ui.app import build_app
from lora_gui.ui.generate import edit_settings, generate, pick_base_model, pick_run
from lora_gui.ui.model_choices import TINY_CHOICE, TINY_CHOICES

INSTRUCTION = "colour this photo"
SIZE, STEPS, GUIDANCE, SEED = 64, 2, 2.5, 4


@pytest.fixture(scope="module")
def edit_run(tiny_models, tmp_path_factory) -> SimpleNamespace:
    """A tiny Kontext trained on pairs (the photos in gray -> the photos), and a gray picture it never saw to edit."""
    root = tmp_path_factory.mktemp("edit-run")
    photos = write_demo_dataset(root / "photos", count=2, size=(64, 64))
    model = tiny_models("flux-kontext")
    train(quick_config(model, photos, max_steps=4, rank=4, alpha=8, learning_rate=3e-3), root / "run")
    unseen = write_demo_dataset(root / "unseen", count=1, size=(SIZE, SIZE))
    before = next(gray_before_pictures(unseen).glob("*.png"))
    return SimpleNamespace(model=model, run=root / "run", before=before)


@pytest.fixture(scope="module")
def diffusers_edits(edit_run) -> dict[str, np.ndarray]:
    """The unseen picture edited by diffusers' own pipeline, as its users load a LoRA: the base model's edit, each of
    the run's two files at strength 1 (diffusers' and the kohya/ComfyUI one), and both at strength 0."""
    pipe = FluxKontextPipeline.from_pretrained(edit_run.model)
    pipe.set_progress_bar_config(disable=True)
    before = Image.open(edit_run.before).convert("RGB")

    def edit() -> np.ndarray:
        return pipe(
            image=before,
            prompt=INSTRUCTION,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            max_area=SIZE * SIZE,  # at the picture's own size, not resized to Kontext's 1 MP
            _auto_resize=False,
            generator=torch.Generator().manual_seed(SEED),
            output_type="np",
        ).images[0]

    edits = {"base": edit()}
    for name in (DIFFUSERS_LORA, "run.safetensors"):
        with warnings.catch_warnings():  # peft warns when a second adapter joins: both are here on purpose
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(edit_run.run, weight_name=name, adapter_name=name.replace(".", "_"))
    for name in pipe.get_list_adapters()["transformer"]:
        pipe.set_adapters([name], adapter_weights=[1.0])
        edits[name] = edit()
    pipe.set_adapters(list(pipe.get_list_adapters()["transformer"]), adapter_weights=[0.0, 0.0])
    edits["zero"] = edit()
    return edits


@pytest.mark.train
def test_diffusers_kontext_pipeline_edits_with_either_file_and_strength_zero_gives_the_bases_edit(diffusers_edits):
    base, zero = diffusers_edits.pop("base"), diffusers_edits.pop("zero")
    diffusers_file, kohya_file = diffusers_edits.values()
    assert np.abs(diffusers_file - base).max() > 1e-2, "the edit LoRA changes nothing"
    np.testing.assert_allclose(kohya_file, diffusers_file, atol=1e-4)
    np.testing.assert_array_equal(zero, base)


def generate_argv(model: Path, output: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--base-model",
        str(model),
        "--prompt",
        INSTRUCTION,
        "--steps",
        str(STEPS),
        "--guidance",
        str(GUIDANCE),
        "--seed",
        str(SEED),
        "--output",
        str(output),
        *extra,
    ]


@pytest.mark.train
def test_generate_image_from_the_cli_edits_the_picture_as_diffusers_does(edit_run, diffusers_edits, tmp_path):
    output = tmp_path / "edited.png"
    lora, picture = ("--lora", str(edit_run.run)), ("--image", str(edit_run.before))
    assert main(generate_argv(edit_run.model, output, *lora, *picture, "--width", str(SIZE))) == 0
    edited = np.asarray(Image.open(output), dtype=float) / 255
    # The picture's square shape, and diffusers' edit with the run's LoRA (to the PNG's rounding).
    np.testing.assert_allclose(edited, diffusers_edits[DIFFUSERS_LORA.replace(".", "_")], atol=1.5 / 255)


@pytest.mark.train
def test_an_offloaded_model_edits_the_picture_as_a_whole_one(edit_run):
    """Generate offloads a model too large for the card (Generator.load): the VAE encoding the picture to edit inside
    the pipeline comes to the device through diffusers' hooks as the rest does (here the CPU is the device)."""
    generator = Generator.load(str(edit_run.model))
    before = Image.open(edit_run.before)
    settings = dict(prompt=INSTRUCTION, seed=SEED, steps=STEPS, guidance=GUIDANCE, width=SIZE, images=[before])
    generator.set_loras([(edit_run.run, 1.0)])
    whole = np.asarray(generator(**settings))
    generator.pipe.enable_model_cpu_offload(device=generator.device)
    generator.set_loras([(edit_run.run, 1.0)])
    assert getattr(generator.pipe.vae, "_hf_hook", None) is not None
    offloaded = np.asarray(generator(**settings))
    assert offloaded.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(offloaded, whole)


@pytest.mark.train
def test_generate_image_refuses_what_it_cannot_edit_in_a_sentence(edit_run, tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(edit_run.before.read_bytes()[:100])
    refusals = {
        "no such picture file": generate_argv(edit_run.model, tmp_path / "x.png", "--image", str(tmp_path / "no.png")),
        "can't be used: truncated or damaged image": generate_argv(
            edit_run.model, tmp_path / "x.png", "--image", str(broken)
        ),
        "Flux.1 Kontext edits 1 picture at a time, not 2": generate_argv(
            edit_run.model, tmp_path / "x.png", "--image", str(edit_run.before), "--image", str(edit_run.before)
        ),
        "makes pictures from text alone: it can't edit a picture": generate_argv(
            tiny_model, tmp_path / "x.png", "--image", str(edit_run.before)
        ),
    }
    for sentence, argv in refusals.items():
        assert main(argv) == 1, sentence
        said = capsys.readouterr().err
        assert sentence in said and "Traceback" not in said, said
    assert not (tmp_path / "x.png").exists()


# ---- the Generate tab -----------------------------------------------------------------------------------------------
@pytest.mark.app
def test_the_picture_to_edit_shows_for_an_editing_model_and_an_edit_run_fills_in_one_of_its_before_pictures(tmp_path):
    ctx = build_app(tmp_path / "runs", JobManager())[1]
    assert not ctx["gen_picture"].visible, "the page opens on the demo model, which makes pictures from text"
    editing = next(choice for choice, family in TINY_CHOICES.items() if REGISTRY[family].reference_images)
    assert pick_base_model(ctx, editing)["gen_picture"]["visible"]
    assert not pick_base_model(ctx, TINY_CHOICE)["gen_picture"]["visible"]
    assert pick_base_model(ctx, "black-forest-labs/FLUX.1-Kontext-dev")["gen_picture"]["visible"], "not downloaded"

    # An edit run as training leaves it (its LoRA file never read here), its "before" pictures in control/.
    run = RunFolder(ctx.runs_dir / "colourise")
    run.control.mkdir(parents=True)
    TrainConfig(base_model="black-forest-labs/FLUX.1-Kontext-dev", resolution=64).save(run.config)
    TrainingRecord.now("flux-kontext", None, "some/model", 4, 4, 1.0, 1.0, []).save(run.lora_info)
    run.diffusers_lora.write_bytes(b"")
    Image.new("RGB", (48, 32), "gray").save(run.control / "b.png")
    Image.new("RGB", (32, 32), "gray").save(run.control / "a.png")
    picked = pick_run(ctx, EVERYONE, "", "", None, gen_run_1="colourise")["gen_picture"]
    assert picked["visible"] and Image.open(picked["value"]).size == (32, 32), "the first before picture, a.png"
    kept = pick_run(ctx, EVERYONE, "", "", "mine.png", gen_run_1="colourise")["gen_picture"]
    assert kept["visible"] and "value" not in kept, "a picture of their own stays"


@pytest.mark.unit
def test_an_editing_model_without_a_picture_to_edit_says_its_pictures_come_from_the_prompt_alone():
    settings = dict(prompt=INSTRUCTION, width=64, height=64)
    for family in REGISTRY.values():
        made, said = edit_settings(SimpleNamespace(family=family), None, settings, 64)
        assert made == settings
        assert ("from the prompt alone" in said) == bool(family.reference_images), family.name


@pytest.mark.train
def test_the_generate_tab_edits_the_picture_given_with_and_without_the_lora_in_its_shape(edit_run, tmp_path):
    ctx = build_app(tmp_path / "runs", JobManager())[1]
    shutil.copytree(edit_run.run, ctx.runs_dir / "colourise")
    wide = tmp_path / "wide.png"
    Image.open(edit_run.before).resize((96, 64)).save(wide)
    made = generate(
        ctx,
        EVERYONE,
        allow_pickle=False,
        gen_base_model=str(edit_run.model),
        prompt=INSTRUCTION,
        negative_prompt="",
        gen_seed=SEED,
        gen_steps=STEPS,
        guidance=GUIDANCE,
        size=SIZE,
        gen_picture=str(wide),
        gen_run_1="colourise",
        strength_1=1.0,
    )
    assert "Your picture was edited at 80x48 px" in made["gen_notice"], made
    base, with_lora = made["base_image"], made["lora_image"]["value"]
    assert base.size == with_lora.size == (80, 48), "its 3:2 shape, at about 64x64 px"
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(with_lora, dtype=int)).max() > 2


@pytest.mark.train
def test_an_edit_runs_model_card_says_so_and_its_code_edits_a_picture(edit_run):
    from lora_gui.hub import model_card
    from lora_gui.runs import RunFolder

    card = model_card(RunFolder(edit_run.run))
    assert "An edit LoRA, learned from before/after pairs, for Flux.1 Kontext" in card
    assert "from diffusers.utils import load_image" in card
    assert 'image = pipe(image=load_image("picture.png"), prompt=' in card
