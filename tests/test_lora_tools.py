"""Resizing a LoRA to a lower rank and merging LoRAs: both layouts written with what was done, pictures that match
the LoRAs they came from, the command line, and the Runs tab's handlers as each visitor may use them."""

from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.lora_files import kohya_file_by_hand, peft_pipe, set_strengths
from helpers.pipes import image
from helpers.runs import quick_config
from safetensors import safe_open
from safetensors.torch import save_file

from lora_gui.cli import main
from lora_gui.demo import write_demo_dataset
from lora_gui.errors import LoraFileError
from lora_gui.families import get_family
from lora_gui.infer import Generator
from lora_gui.jobs import JobManager
from lora_gui.lora_files.reshape import Layer, Lora, diffusers_twin, merge_loras, read_lora, resize_lora
from lora_gui.lora_files.reshape import merge as merge_loras_in_memory
from lora_gui.owners import Visitor, anonymous
from lora_gui.training import train
from lora_gui.ui.app import build_app
from lora_gui.ui.runs import merge, resize


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118


def ranks(path: Path) -> set[int]:
    tensors, _ = read(path)
    return {tensor.shape[0] for key, tensor in tensors.items() if key.endswith(("lora_down.weight", "lora_A.weight"))}


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """Two rank-4 kohya files made from random peft LoRAs (alpha 8 and 2), the pictures they make, and a model to
    load them on."""
    folder = tmp_path_factory.mktemp("loras")
    source = peft_pipe(tiny_model, {"a": 8.0, "b": 2.0})
    pictures = {}
    for strengths in ({"a": 1.0}, {"a": 1.0, "b": 0.5}):
        set_strengths(source, strengths)
        pictures[tuple(strengths.values())] = image(source.pipe)
    return SimpleNamespace(
        folder=folder,
        a=kohya_file_by_hand(source, "a", folder / "a.safetensors"),
        b=kohya_file_by_hand(source, "b", folder / "b.safetensors"),
        pictures=pictures,
        generator=Generator.load(str(tiny_model)),
    )


def generated(made: SimpleNamespace, lora: Path) -> np.ndarray:
    made.generator.set_loras([(lora, 1.0)])
    return image(made.generator.pipe)


@pytest.mark.train
def test_resizing_cuts_every_layer_in_both_files_and_says_how_much_it_kept(made, tmp_path):
    result = resize_lora(made.a, 2, tmp_path / "small.safetensors")
    kohya, twin = result.files
    assert twin == diffusers_twin(kohya) == tmp_path / "small.diffusers.safetensors"
    assert ranks(kohya) == ranks(twin) == {2} and ranks(made.a) == {4}
    tensors, metadata = read(kohya)
    assert {float(tensor) for key, tensor in tensors.items() if key.endswith(".alpha")} == {2.0}, "scale 1"
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_output_name"] == "small" and metadata["sshs_model_hash"]
    assert 0 < result.least_energy <= result.mean_energy < 1
    assert len(result.energy) == len(read_lora(made.a).layers)
    assert metadata["ss_training_comment"] == result.note
    assert (
        result.note.startswith("resized from rank 4 to 2, ")
        and "% of the energy kept (least in a layer: " in result.note
    )
    assert read(twin)[1]["ss_training_comment"] == result.note


@pytest.mark.train
def test_a_resized_lora_at_full_rank_gives_the_same_picture_in_diffusers_and_in_generate(made, tmp_path):
    result = resize_lora(made.a, 4, tmp_path / "same.safetensors")
    assert result.least_energy == pytest.approx(1.0)
    kohya, twin = result.files
    made.generator.set_loras([])
    pipe = made.generator.pipe
    pipe.load_lora_weights(tmp_path, weight_name=kohya.name, adapter_name="resized")  # diffusers' own loader
    np.testing.assert_allclose(image(pipe), made.pictures[(1.0,)], atol=1e-4)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(generated(made, twin), made.pictures[(1.0,)], atol=1e-4)


@pytest.mark.train
def test_merging_exactly_gives_the_picture_of_both_loras_at_their_strengths(made, tmp_path):
    result = merge_loras([(made.a, 1.0), (made.b, 0.5)], tmp_path / "both.safetensors")
    assert result.note == "merged a.safetensors x1.0 + b.safetensors x0.5"
    kohya, twin = result.files
    assert ranks(kohya) == ranks(twin) == {8}, "the ranks add"
    assert read(kohya)[1]["ss_network_dim"] == "8"
    np.testing.assert_allclose(generated(made, kohya), made.pictures[(1.0, 0.5)], atol=1e-4)


@pytest.mark.train
def test_merging_by_svd_to_a_rank_that_holds_everything_is_as_exact(made, tmp_path):
    diffusers_a = resize_lora(made.a, 4, tmp_path / "a4.safetensors").files[1]  # a diffusers-layout input too
    result = merge_loras([(diffusers_a, 1.0), (made.b, 0.5)], tmp_path / "svd.safetensors", rank=8)
    assert result.least_energy == pytest.approx(1.0)
    assert "cut to rank 8, 100.0% of the energy kept" in result.note
    np.testing.assert_allclose(generated(made, result.files[1]), made.pictures[(1.0, 0.5)], atol=1e-4)
    cut = merge_loras([(made.a, 1.0), (made.b, 0.5)], tmp_path / "cut.safetensors", rank=3)
    assert ranks(cut.files[0]) == {3} and cut.least_energy < 1


@pytest.mark.train
def test_files_that_are_not_plain_lora_get_a_plain_message(made, tmp_path):
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(loha))
    with pytest.raises(LoraFileError, match=r"loha\.safetensors is a LyCORIS LoHa file; resizing and merging work on"):
        read_lora(loha)
    dora = tmp_path / "dora.safetensors"
    tensors, _ = read(made.a)
    module = next(key for key in tensors if key.endswith(".alpha")).removesuffix(".alpha")
    save_file({**tensors, f"{module}.dora_scale": torch.ones(1, 8)}, str(dora))
    with pytest.raises(LoraFileError, match=r"dora\.safetensors is a DoRA file; resizing and merging work on plain"):
        resize_lora(dora, 2, tmp_path / "out.safetensors")


@pytest.mark.unit
def test_merging_loras_for_different_models_or_to_no_rank_is_refused():
    def lora(family: str, width: int) -> Lora:
        layer = Layer(torch.ones(2, width), torch.ones(8, 2), 2.0)
        return Lora(get_family(family), {"unet.mid_block.attentions.0.proj_in": layer}, {}, f"{family}.safetensors")

    with pytest.raises(LoraFileError, match=r"sdxl\.safetensors is for Stable Diffusion XL and sd15\.safetensors for"):
        merge_loras_in_memory([(lora("sd15", 8), 1.0), (lora("sdxl", 8), 1.0)])
    with pytest.raises(LoraFileError, match=r"adapt unet\.mid_block\.attentions\.0\.proj_in with different shapes"):
        merge_loras_in_memory([(lora("sd15", 8), 1.0), (lora("sd2", 16), 1.0)])
    with pytest.raises(LoraFileError, match="rank is a whole number of at least 1, not 0"):
        merge_loras_in_memory([(lora("sd15", 8), 1.0), (lora("sd15", 8), 1.0)], rank=0)


@pytest.fixture(scope="module")
def runs_dir(tiny_model, tmp_path_factory) -> Path:
    """A runs folder with one short run of the command line's (no owner: the one local user's)."""
    runs = tmp_path_factory.mktemp("runs")
    photos = write_demo_dataset(tmp_path_factory.mktemp("photos"), count=2, size=(64, 64))
    train(quick_config(tiny_model, photos, max_steps=1, sample_every=0, rank=4, alpha=2), runs / "mine")
    return runs


@pytest.mark.train
def test_the_command_line_resizes_a_run_by_name_and_merges_files(runs_dir, made, tmp_path, capsys):
    out = tmp_path / "mine-2.safetensors"
    assert main(["resize", "mine", "--runs-dir", str(runs_dir), "--rank", "2", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Resized from rank 4 to 2, " in err and f"Wrote {diffusers_twin(out)}" in err
    metadata = read(out)[1]
    assert metadata["ss_network_dim"] == "2" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_num_train_images"] == "2", "the run's own metadata is kept"

    merged = tmp_path / "ab.safetensors"
    assert main(["merge", str(made.a), str(made.b), "--weights", "1", "0.5", "--output", str(merged)]) == 0
    assert "Merged a.safetensors x1.0 + b.safetensors x0.5." in capsys.readouterr().err and merged.is_file()
    assert main(["merge", str(made.a), str(made.b), "--weights", "1", "--output", str(merged)]) == 1
    assert "--weights gives 1 strengths for 2 LoRAs" in capsys.readouterr().err
    assert main(["resize", "nothing-here", "--runs-dir", str(runs_dir), "--rank", "2", "--output", str(out)]) == 1
    assert "nothing-here is neither a LoRA file, a run folder nor the name of a run" in capsys.readouterr().err


@pytest.mark.train
def test_the_runs_tab_resizes_and_merges_a_visitors_run_and_not_a_strangers(runs_dir, made):
    _, ctx = build_app(runs_dir, JobManager())
    owner = Visitor(sees_everything=True)
    resized = resize(ctx, owner, run_pick="mine", tools_rank=2)
    assert "mine-rank2.safetensors: resized from rank 4 to 2, " in html.unescape(resized["tools_notice"])
    assert [Path(path).name for path in resized["tools_files"]] == [
        "mine-rank2.safetensors",
        "mine-rank2.diffusers.safetensors",
    ]
    assert (runs_dir / "mine" / "tools" / "mine-rank2.safetensors").is_file(), "it lives in the run folder"

    merged = merge(ctx, owner, "mine", ["mine"], str(made.b), 1.0, 0.5, tools_merge_rank=0)
    notice = html.unescape(merged["tools_notice"])
    assert "merged mine x1.0 + mine x0.5 + b.safetensors x0.5" in notice
    # The run adapts fewer layers than b: those only b adapts keep b's rank.
    assert ranks(runs_dir / "mine" / "tools" / "mine-merged.safetensors") == {4, 12}
    nothing = merge(ctx, owner, "mine", [], None, 1.0, 1.0, tools_merge_rank=0)
    assert "Pick another of your runs or upload a LoRA file to merge with" in html.unescape(nothing["tools_notice"])

    stranger = Visitor(owner=anonymous("a stranger's secret"))
    assert "There is no run named mine" in resize(ctx, stranger, run_pick="mine", tools_rank=2)["tools_notice"]
    refused = merge(ctx, stranger, "mine", [], str(made.b), 1.0, 1.0, tools_merge_rank=2)
    assert "There is no run named mine" in refused["tools_notice"] and refused["tools_files"] is None
