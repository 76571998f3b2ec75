"""LoRA files that load everywhere: both layouts, their metadata, and exporting a run again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import quick_config
from safetensors import safe_open
from safetensors.torch import load_file, save
from test_train import fresh_pipe, image

from lora_gui import events
from lora_gui import train as train_module
from lora_gui.__main__ import main
from lora_gui.demo import write_demo_dataset
from lora_gui.kohya import kohya_hashes
from lora_gui.train import train

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> SimpleNamespace:
    """One short run with alpha != rank, the text encoder trained and a trigger word; and its in-memory image."""
    root = tmp_path_factory.mktemp("formats")
    photos = write_demo_dataset(root / "photos", count=6, size=(96, 96))
    write_demo_dataset(root / "photos" / "extra", count=2, size=(96, 96))
    for caption in (root / "photos" / "extra").glob("*.txt"):
        caption.write_text("Shiny, toy , sks,\n", encoding="utf-8")
    config = quick_config(
        tiny_models("sd15"),
        photos,
        max_steps=4,
        rank=4,
        alpha=2,
        train_text_encoder=True,
        trigger_word="sks",
        target_modules=UNET_TARGETS,
        text_encoder_target_modules=TEXT_TARGETS,
    )
    in_memory = {}
    real_save = train_module.save_diffusers_lora

    def save_and_remember(target, pipe, family):
        in_memory["image"] = image(pipe)
        return real_save(target, pipe, family)

    received = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "save_diffusers_lora", save_and_remember)
        train(config, root / "my-lora", on_event=received.append)
    run = root / "my-lora"
    return SimpleNamespace(
        run=run, model=tiny_models("sd15"), image=in_memory["image"], events=received, kohya=run / "my-lora.safetensors"
    )


# ---- export ------------------------------------------------------------------------------------
def test_training_writes_the_kohya_file_beside_the_diffusers_file(trained):
    finished = trained.events[-1]
    assert finished.kind == events.FINISHED
    assert finished.data["files"] == [
        str(trained.run / "pytorch_lora_weights.safetensors"),
        str(trained.kohya),
    ]
    assert all(Path(path).is_file() for path in finished.data["files"])
    checkpoint = trained.run / "checkpoints/step-4"
    assert [p.name for p in checkpoint.glob("*.safetensors")] == ["pytorch_lora_weights.safetensors"], (
        "checkpoints keep only what resume reads"
    )


def test_every_kohya_key_names_a_real_module_and_carries_down_up_and_alpha(trained):
    pipe = fresh_pipe(trained.model)
    # kohya's rule: prefix + module path with "." as "_"; CLIP under its canonical text_model. names,
    # which transformers 5 no longer has as a level of the module tree.
    unet = {"lora_unet_" + name.replace(".", "_") for name, _ in pipe.unet.named_modules() if name}
    canonical = ["text_model." + name for name, _ in pipe.text_encoder.named_modules() if name]
    text = {"lora_te_" + name.replace(".", "_") for name in canonical}
    tensors, _ = read(trained.kohya)
    modules: dict[str, set[str]] = {}
    for key in tensors:
        module, _, part = key.partition(".")
        modules.setdefault(module, set()).add(part)
    assert all(module in unet | text for module in modules), sorted(set(modules) - unet - text)[:5]
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in modules.values())
    assert any(module.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for module in modules)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in modules, "conv layers are converted too"
    for module in modules:
        assert tensors[f"{module}.alpha"].shape == () and tensors[f"{module}.alpha"].item() == 2.0
        assert tensors[f"{module}.lora_down.weight"].shape[0] == 4
    diffusers_file = load_file(trained.run / "pytorch_lora_weights.safetensors")
    assert len(modules) * 2 == len(diffusers_file), "every trained layer is in the kohya file"


@pytest.mark.parametrize("name", ["pytorch_lora_weights.safetensors", "my-lora.safetensors"])
def test_both_files_loaded_by_diffusers_give_the_trained_models_image(trained, name):
    base = image(fresh_pipe(trained.model))
    pipe = fresh_pipe(trained.model)
    pipe.load_lora_weights(trained.run, weight_name=name)
    loaded = image(pipe)
    assert np.abs(loaded - base).max() > 1e-3, "the LoRA changes nothing"
    np.testing.assert_allclose(loaded, trained.image, atol=1e-4)


def test_kohya_metadata_says_how_the_lora_was_trained(trained):
    _, metadata = read(trained.kohya)
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": "my-lora",
        "ss_sd_model_name": "sd15",
        "ss_resolution": "(64, 64)",
        "ss_steps": "4",
        "ss_max_train_steps": "4",
        # 4 steps of 2 images over 8 images: one pass exactly.
        "ss_epoch": "1",
        "ss_num_epochs": "1",
        "ss_num_train_images": "8",
        "ss_learning_rate": "0.001",
        "ss_text_encoder_lr": "0.001",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my-lora",
        "modelspec.resolution": "64x64",
        "modelspec.trigger_phrase": "sks",
        "modelspec.prediction_type": "epsilon",
    }
    assert {key: metadata.get(key) for key in expected} == expected
    assert "sks" in metadata["ss_training_comment"] and "sks" in metadata["modelspec.usage_hint"]
    started, finished = float(metadata["ss_training_started_at"]), float(metadata["ss_training_finished_at"])
    assert 0 < finished - started < 600
    assert metadata["modelspec.date"].startswith("20")
    frequency = json.loads(metadata["ss_tag_frequency"])
    assert frequency["dataset"]["sks"] == 6 and frequency["dataset"]["a photo of a red circle"] == 1
    assert frequency["extra"] == {"shiny": 2, "toy": 2, "sks": 2}, "split on commas, stripped, lowercased"
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "dataset": {"n_repeats": 1, "img_count": 6},
        "extra": {"n_repeats": 1, "img_count": 2},
    }


def test_hashes_match_an_independent_computation(trained):
    raw = trained.kohya.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    tensor_data = hashlib.sha256(raw[8 + header :]).hexdigest()
    tensors, metadata = read(trained.kohya)
    assert metadata["sshs_model_hash"] == tensor_data
    assert metadata["modelspec.hash_sha256"] == "0x" + tensor_data
    training_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    legacy = hashlib.sha256(save(tensors, training_only)[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["sshs_legacy_hash"] == legacy


def test_the_legacy_hash_reads_the_64_kib_at_1_mib():
    # Real LoRAs are bigger than 1 MiB, where the legacy hash stops being the hash of nothing.
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32)}
    metadata = {"ss_network_dim": "4", "modelspec.title": "not hashed"}
    data = save(tensors, {"ss_network_dim": "4"})
    hashes = kohya_hashes(tensors, metadata)
    assert hashes["sshs_legacy_hash"] == hashlib.sha256(data[1 << 20 : (1 << 20) + (1 << 16)]).hexdigest()[:8]
    assert hashes["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    assert hashes == kohya_hashes(tensors, {**metadata, "modelspec.title": "edited"}), "only ss_ keys count"


def test_exporting_a_run_again_gives_what_training_wrote(trained, tmp_path, capsys):
    written = read(trained.kohya)
    assert main(["export", str(trained.run), "--output", str(tmp_path / "again.safetensors")]) == 0
    again = read(tmp_path / "again.safetensors")
    assert again[1] == written[1]
    assert again[0].keys() == written[0].keys()
    assert all(torch.equal(again[0][key], written[0][key]) for key in written[0])

    assert main(["export", str(trained.run), "--format", "both", "--output", str(tmp_path / "both")]) == 0
    assert read(tmp_path / "both/my-lora.safetensors")[1] == written[1]
    diffusers_file = (tmp_path / "both/pytorch_lora_weights.safetensors").read_bytes()
    assert diffusers_file == (trained.run / "pytorch_lora_weights.safetensors").read_bytes()
    assert "Wrote" in capsys.readouterr().err


def test_exporting_a_run_without_a_lora_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "holds no pytorch_lora_weights.safetensors" in err and "Traceback" not in err
