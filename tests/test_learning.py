"""A LoRA learns what its pictures show: after the demo's short run, the pictures the model makes move toward the
training pictures, by a measured statistic; at strength 0 they do not move at all; and the same run with a broken
objective (a test-only switch) does not get there. Once per objective: epsilon (SD 1.x and SDXL), v-prediction (SD 2's
768 px models) and rectified flow (Flux.1).

The demo model (`demo.DEMO_MODEL`, trained on drawn circles, squares and triangles) has never seen the demo's concept,
a pink cross called "zqx": the share of pink in its pictures is the statistic. A wrong loss target, noise schedule or
LoRA scale leaves the loss going down a little; it does not make the model draw a pink cross.

The v-prediction and flow models are the demo model's kin, trained by scripts/demo_base/ on the same scenes
(`train.py --prediction-type v_prediction`: its UNet and text encoder taught to predict the velocity;
`train_flux.py`: a Flux.1-shaped transformer and T5 on its VAE and CLIP). tests/models/ holds only the files that
differ from the demo model's, which `assembled` lays over a copy of it; the flow model ships with the app as the edit
demo's model (`demo.DEMO_EDIT_OVERLAY`, a Kontext pipeline), read here as the Flux.1 pipeline it was trained as.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers.pipes import pink_share
from PIL import Image

from lora_gui import objectives
from lora_gui.demo import (
    CONCEPT_BACKGROUNDS,
    DEMO_EDIT_OVERLAY,
    DEMO_MODEL,
    DEMO_RESOLUTION,
    concept_caption,
    demo_config,
    write_demo_concept,
)
from lora_gui.infer import Generator
from lora_gui.training import train

pytestmark = pytest.mark.train

MODELS = Path(__file__).parent / "models"
SEEDS = (0, 1, 2, 3)
# The training pictures are about 30% pink; the three models alone draw none. Measured (these 4 seeds): after the
# run below 68% (epsilon), 36% (v-prediction) and 28% (flow); with the broken objective 0%.
LEARNT = 0.10
NOT_LEARNT = 0.03


def pictures(generate: Generator) -> list[np.ndarray]:
    """The demo's first caption, "a zqx on a gray background", with four seeds, as the Generate tab makes them with
    the model's own sampler, in 20 steps at 64 px, with guidance 4: Stable Diffusion's usual 7 overdrives the small
    v-prediction model (its colours wash out to white). The Flux model, like Flux.1-schnell, has no guidance input."""
    caption = concept_caption(CONCEPT_BACKGROUNDS[0])
    size = DEMO_RESOLUTION
    return [np.asarray(generate(caption, seed=seed, steps=20, guidance=4.0, width=size, height=size)) for seed in SEEDS]


def mean_pink(images: list[np.ndarray]) -> float:
    return float(np.mean([pink_share(image) for image in images]))


def demo_run(model: Path, data: Path, run_dir: Path) -> Path:
    """The demo's run as Try the demo sets it up, in half the steps at twice the learning rate (the browser test runs
    the demo's own), without previews; Flux's text encoders stay frozen, as the app trains Flux."""
    flux = (model / "transformer").is_dir()
    config = replace(
        demo_config(data),
        base_model=str(model),
        max_steps=200,
        learning_rate=4e-3,
        sample_every=0,
        train_text_encoder=not flux,
    )
    train(config, run_dir)
    return run_dir


def assembled(overlay: Path, folder: Path) -> Path:
    """A copy of the demo model with the overlay's files laid over it, less the parts its model_index.json does not
    name (the Flux model has no UNet)."""
    shutil.copytree(DEMO_MODEL, folder)
    shutil.copytree(overlay, folder, dirs_exist_ok=True)
    parts = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for part in folder.iterdir():
        if part.is_dir() and part.name not in parts:
            shutil.rmtree(part)
    return folder


@pytest.fixture(scope="module")
def concept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_concept(tmp_path_factory.mktemp("concept"))


@pytest.fixture(scope="module", params=["epsilon", "v_prediction", "flow"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "epsilon":
        return DEMO_MODEL
    overlay = {"v_prediction": MODELS / "demo-v-prediction", "flow": DEMO_EDIT_OVERLAY}[request.param]
    folder = assembled(overlay, tmp_path_factory.mktemp(request.param) / "model")
    if request.param == "flow":  # the text-to-image model the edit demo's is
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def generate(model: Path) -> Generator:
    return Generator.load(str(model))


@pytest.fixture(scope="module")
def base_pictures(generate: Generator) -> list[np.ndarray]:
    generate.set_loras([])
    return pictures(generate)


def test_the_training_pictures_are_pink_and_the_model_draws_none(concept, base_pictures):
    shares = [pink_share(np.asarray(Image.open(path).convert("RGB"))) for path in sorted(concept.glob("*.png"))]
    assert min(shares) > 0.2, shares
    assert mean_pink(base_pictures) < NOT_LEARNT


def test_the_demo_lora_draws_the_new_concept_and_strength_zero_is_the_base(
    model, concept, generate, base_pictures, tmp_path
):
    run = demo_run(model, concept, tmp_path / "run")
    generate.set_loras([(run, 1.0)])
    learnt = mean_pink(pictures(generate))
    assert learnt > LEARNT, f"the LoRA's pictures are {learnt:.1%} pink, the base's {mean_pink(base_pictures):.1%}"

    generate.set_loras([(run, 0.0)])
    at_zero = np.stack(pictures(generate)).astype(int)
    assert np.abs(at_zero - np.stack(base_pictures)).max() <= 1  # the same picture, to a rounding of a level


# One model per objective class (NoisePrediction, FlowMatching) proves the statistic tells a wrong sign from a right
# one; the v-prediction model's run (32 s) would repeat NoisePrediction's, within the suite's time budget.
@pytest.mark.parametrize("model", ["epsilon", "flow"], indirect=True)
def test_a_broken_objective_does_not_teach_it(model, concept, generate, tmp_path, monkeypatch):
    """The test-only switch: the loop's target points the other way (minus the noise, minus the velocity, the picture
    minus the noise for Flux), a sign convention that differs between papers and trainers. The run ends as usual; the
    concept is not learnt, so the statistic above tells a right objective from a wrong one.

    (Reading a v-prediction model as an epsilon one, the other plausible slip, still teaches it the pink: 30% after the
    demo's run. The statistic can't catch that one, so it is not the switch here.)"""
    for objective in (objectives.NoisePrediction, objectives.FlowMatching):
        right = objective.target
        monkeypatch.setattr(objective, "target", lambda self, *args, right=right: -right(self, *args))
    run = demo_run(model, concept, tmp_path / "run")
    generate.set_loras([(run, 1.0)])
    assert mean_pink(pictures(generate)) < NOT_LEARNT
