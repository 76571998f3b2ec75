"""LoRA files that load everywhere, LoRAs made elsewhere that load here, and sharing a run."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers.lora_files import TEXT_TARGETS, UNET_TARGETS, kohya_file_by_hand, peft_pipe, set_strengths
from helpers.pipes import fresh_pipe, image, train_and_picture
from helpers.runs import quick_config
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from lora_gui import events
from lora_gui.cli import main
from lora_gui.demo import write_demo_dataset
from lora_gui.errors import LoraFileError, LoraGuiError
from lora_gui.families import REGISTRY
from lora_gui.infer import Generator
from lora_gui.lora_files.detect import detect_layout
from lora_gui.lora_files.kohya_layout import kohya_hashes
from lora_gui.training import train


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
    received = []
    trained = train_and_picture(config, root / "my-lora", on_event=received.append)
    run = root / "my-lora"
    return SimpleNamespace(
        run=run, model=tiny_models("sd15"), image=trained, events=received, kohya=run / "my-lora.safetensors"
    )


# ---- export ------------------------------------------------------------------------------------
@pytest.mark.train
def test_training_writes_the_kohya_file_beside_the_diffusers_file(trained):
    finished = trained.events[-1]
    assert finished.kind == events.FINISHED
    assert finished.data["files"] == [
        str(trained.run / "pytorch_lora_weights.safetensors"),
        str(trained.kohya),
        str(trained.run / "README.md"),
    ]
    assert all(Path(path).is_file() for path in finished.data["files"])
    checkpoint = trained.run / "checkpoints/step-4"
    assert [p.name for p in checkpoint.glob("*.safetensors")] == ["pytorch_lora_weights.safetensors"], (
        "checkpoints keep only what resume reads"
    )


@pytest.mark.train
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


@pytest.mark.train
@pytest.mark.parametrize("name", ["pytorch_lora_weights.safetensors", "my-lora.safetensors"])
def test_both_files_loaded_by_diffusers_give_the_trained_models_image(trained, name):
    base = image(fresh_pipe(trained.model))
    pipe = fresh_pipe(trained.model)
    pipe.load_lora_weights(trained.run, weight_name=name)
    loaded = image(pipe)
    assert np.abs(loaded - base).max() > 1e-3, "the LoRA changes nothing"
    np.testing.assert_allclose(loaded, trained.image, atol=1e-4)


@pytest.mark.train
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


@pytest.mark.train
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


@pytest.mark.unit
def test_the_legacy_hash_reads_the_64_kib_at_1_mib():
    # Real LoRAs are bigger than 1 MiB, where the legacy hash stops being the hash of nothing.
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32)}
    metadata = {"ss_network_dim": "4", "modelspec.title": "not hashed"}
    data = save(tensors, {"ss_network_dim": "4"})
    hashes = kohya_hashes(tensors, metadata)
    assert hashes["sshs_legacy_hash"] == hashlib.sha256(data[1 << 20 : (1 << 20) + (1 << 16)]).hexdigest()[:8]
    assert hashes["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    assert hashes == kohya_hashes(tensors, {**metadata, "modelspec.title": "edited"}), "only ss_ keys count"


@pytest.mark.train
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


@pytest.mark.unit
def test_exporting_a_run_without_a_lora_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "holds no pytorch_lora_weights.safetensors" in err and "Traceback" not in err


# ---- import ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outside(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """Two kohya files made from peft LoRAs outside this app (alpha 8 and 2, rank 4), and the images they make."""
    folder = tmp_path_factory.mktemp("outside")
    source = peft_pipe(tiny_model, {"a": 8.0, "b": 2.0})
    images = {}
    for strengths in ({"a": 1.0}, {"a": 0.5}, {"a": 1.0, "b": 0.5}):
        set_strengths(source, strengths)
        images[tuple(strengths.items())] = image(source.pipe)
    return SimpleNamespace(
        a=kohya_file_by_hand(source, "a", folder / "a.safetensors"),
        b=kohya_file_by_hand(source, "b", folder / "b.safetensors"),
        images=images,
        base=image(Generator.load(str(tiny_model)).pipe),
    )


@pytest.mark.train
def test_a_kohya_lora_made_elsewhere_loads_at_the_right_strength(tiny_model, outside):
    generator = Generator.load(str(tiny_model))
    generator.set_loras([(outside.a, 1.0)])
    at_one = image(generator.pipe)
    assert np.abs(at_one - outside.base).max() > 1e-3, "the LoRA changes nothing"
    np.testing.assert_allclose(at_one, outside.images[(("a", 1.0),)], atol=1e-4)
    generator.set_loras([(outside.a, 0.5)])
    np.testing.assert_allclose(image(generator.pipe), outside.images[(("a", 0.5),)], atol=1e-4)


@pytest.mark.train
def test_several_loras_at_once_each_at_its_own_strength(tiny_model, outside):
    generator = Generator.load(str(tiny_model))
    generator.set_loras([(outside.a, 1.0), (outside.b, 0.5)])
    np.testing.assert_allclose(image(generator.pipe), outside.images[(("a", 1.0), ("b", 0.5))], atol=1e-4)
    generator.set_loras([])
    np.testing.assert_allclose(image(generator.pipe), outside.base, atol=1e-6)


@pytest.mark.train
def test_a_pickled_lora_is_refused_unless_allowed(tiny_model, outside, tmp_path):
    pickled = tmp_path / "a.pt"
    torch.save(load_file(outside.a), pickled)
    generator = Generator.load(str(tiny_model))
    with pytest.raises(LoraFileError, match="pickled file, which can run any code"):
        generator.set_loras([(pickled, 1.0)])
    generator.set_loras([(pickled, 1.0)], allow_pickle=True)
    np.testing.assert_allclose(image(generator.pipe), outside.images[(("a", 1.0),)], atol=1e-4)


@pytest.mark.train
def test_generate_on_the_command_line_takes_a_foreign_lora(tiny_model, outside, tmp_path):
    common = ["generate", "--base-model", str(tiny_model), "--prompt", "a red circle", "--steps", "2"]
    common += ["--width", "64", "--height", "64", "--lora", str(outside.a), "--lora", str(outside.b)]
    assert main([*common, "--scale", "0.5", "--scale", "0.7", "--output", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").is_file()


def lycoris_oft(path: Path) -> Path:
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{module}.oft_blocks": torch.zeros(4, 8, 8), f"{module}.alpha": torch.tensor(1.0)}, path)
    return path


def sdxl_kohya(path: Path) -> Path:
    save_file(
        {
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
        },
        path,
    )
    return path


@pytest.mark.train
def test_a_lora_that_cannot_be_applied_says_what_it_is_and_why(tiny_models, trained, tmp_path):
    generator = Generator.load(str(tiny_models("sd15")))
    with pytest.raises(LoraFileError, match=r"LyCORIS OFT file.*can't apply OFT.*AUTOMATIC1111, Forge and ComfyUI"):
        generator.set_loras([(trained.kohya, 1.0), (lycoris_oft(tmp_path / "oft.safetensors"), 1.0)])
    assert not generator.pipe.get_list_adapters(), "a failed set leaves no LoRA behind"
    with pytest.raises(LoraFileError, match=r"made for Stable Diffusion XL \(it has weights for a second text"):
        generator.set_loras([(sdxl_kohya(tmp_path / "xl.safetensors"), 1.0)])

    sd2 = Generator.load(str(tiny_models("sd2")))
    with pytest.raises(LoraFileError, match=r"kohya.*made for a model whose text features are 32 wide.*Stable Diff"):
        sd2.set_loras([(trained.kohya, 1.0)])

    tensors = load_file(trained.kohya)
    moved = {key.replace("down_blocks_0_attentions_0", "down_blocks_0_attentions_7"): v for key, v in tensors.items()}
    save_file(moved, tmp_path / "moved.safetensors")
    with pytest.raises(LoraFileError, match=r"only \d+ of the \d+ layers in moved.safetensors"):
        generator.set_loras([(tmp_path / "moved.safetensors", 1.0)])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("keys", "layout", "applicable"),
    [
        (["unet.down_blocks.0.attn1.to_q.lora_A.weight", "unet.down_blocks.0.attn1.to_q.lora_B.weight"], "peft", True),
        (["unet.a.attn1.processor.to_q_lora.down.weight", "unet.a.attn1.processor.to_q_lora.up.weight"], "older", True),
        (["text_encoder.text_model.a.mlp.fc1.lora_linear_layer.down.weight"], "older", True),
        (["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha"], "kohya", True),
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_te3_a.lora_down.weight"], "kohya", True),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"], "ComfyUI", True),
        (["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"], "peft", True),  # ai-toolkit's
        (["lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2_a", "lora_unet_a.alpha"], "LoKr", True),
        (["lora_unet_a.lora_down.weight", "lora_unet_a.lora_mid.weight"], "Tucker", False),
        (["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.dora_scale"], "DoRA", True),
        (["lora_unet_a.oft_blocks", "lora_unet_a.alpha"], "OFT", False),
        (["lora_unet_a.diff", "lora_unet_a.diff_b"], "full", False),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "whole", False),
        (["emb_params"], "embedding", False),
        (["something.else"], "unknown", False),
    ],
)
def test_the_layout_of_a_lora_file_is_told_from_its_tensor_names(keys, layout, applicable):
    found = detect_layout(keys)
    assert layout in f"{found.name} {found.problem}"
    assert (found.problem == "") is applicable


# ---- sharing -----------------------------------------------------------------------------------
def front_matter(card: Path) -> dict:
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.train
def test_the_model_card_carries_what_the_hub_reads(trained, tmp_path):
    card = front_matter(trained.run / "README.md")
    assert "base_model" not in card, "a local base model has no Hub id to link"
    assert {"lora", "text-to-image", "stable-diffusion", "diffusers", "template:sd-lora"} <= set(card["tags"])
    assert card["instance_prompt"] == "sks"
    assert card["widget"] == [{"text": "sks, a photo of a red circle", "output": {"url": "samples/step-4-0.png"}}]
    assert (trained.run / card["widget"][0]["output"]["url"]).is_file()
    body = (trained.run / "README.md").read_text(encoding="utf-8")
    assert "my-lora.safetensors" in body and "load_lora_weights" in body

    copy = tmp_path / "my-lora"
    shutil.copytree(trained.run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((copy / "lora_info.json").read_text())
    (copy / "lora_info.json").write_text(json.dumps({**info, "base_model_hub_id": "someone/base-model"}))
    from lora_gui.hub import write_model_card
    from lora_gui.runs import RunFolder

    assert front_matter(write_model_card(RunFolder(copy)))["base_model"] == "someone/base-model"


def card_code(run: Path) -> str:
    """The Python block of a run's model card, which must compile as a user pastes it."""
    body = (run / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", body, re.DOTALL)
    assert code, "the card shows how to use the LoRA with diffusers"
    compile(code[1], "README.md", "exec")
    return code[1]


@pytest.mark.train
def test_an_sd15_cards_code_loads_the_base_in_fp16_on_the_gpu(trained):
    code = card_code(trained.run)
    assert "torch_dtype=torch.float16" in code and '.to("cuda")' in code
    assert "enable_model_cpu_offload" not in code, "SD 1.5 in fp16 (about 2 GB) fits any GPU whole"


@pytest.mark.train
def test_a_cards_code_runs_the_base_in_its_dtype_and_offloads_flux_which_no_common_gpu_holds(trained_family):
    code = card_code(trained_family.run)
    if trained_family.family in ("flux", "flux2-klein", "chroma", "qwen-image"):
        assert "torch_dtype=torch.bfloat16" in code and "pipe.enable_model_cpu_offload()" in code
        assert "torch.float16" not in code and '.to("cuda")' not in code
        assert re.search(r"^# .*(27|33|35|58) GB", code, re.MULTILINE), "a comment says why it offloads"
    else:  # Z-Image in bf16 (~21 GB with its text encoder) fits a 24 GB card whole
        dtype = "bfloat16" if trained_family.family == "zimage" else "float16"
        assert f"torch_dtype=torch.{dtype}" in code and '.to("cuda")' in code
        assert "enable_model_cpu_offload" not in code


@pytest.mark.train
def test_push_uploads_the_lora_files_card_and_previews_and_never_stores_the_token(
    trained, fake_hub, monkeypatch, capsys, caplog
):
    caplog.set_level("DEBUG")
    secret = "hf_TEST_secret_token_123"
    monkeypatch.setenv("HF_TOKEN", secret)
    assert main(["push", str(trained.run), "--repo", "me/my-lora", "--private"]) == 0
    assert fake_hub.calls[0] == ("init", secret), "the token reaches huggingface_hub, in memory"
    assert fake_hub.calls[1] == ("create_repo", "me/my-lora", True, True)
    assert fake_hub.calls[2] == (
        "upload",
        "me/my-lora",
        ["README.md", "my-lora.safetensors", "pytorch_lora_weights.safetensors", "samples/step-4-0.png"],
    )
    assert 'load_lora_weights("me/my-lora"' in (trained.run / "README.md").read_text()
    output = capsys.readouterr()
    assert "https://huggingface.co/me/my-lora" in output.err
    assert secret not in output.out + output.err + caplog.text
    assert not [p for p in trained.run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.train
def test_push_without_a_network_says_so_and_keeps_everything(trained, fake_hub, monkeypatch, capsys):
    from huggingface_hub import constants

    before = sorted(p.relative_to(trained.run) for p in trained.run.rglob("*"))
    fake_hub.fail = ConnectionError("[Errno 111] Connection refused (token hf_TEST_secret)")
    with pytest.raises(LoraGuiError, match=r"could not reach the Hugging Face Hub.*run folder is unchanged") as raised:
        from lora_gui.hub import push_to_hub

        push_to_hub(trained.run, "me/my-lora", token="hf_TEST_secret")
    assert "hf_TEST_secret" not in str(raised.value)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(trained.run), "--repo", "me/my-lora", "--token", "hf_TEST_secret"]) == 1
    err = capsys.readouterr().err
    assert "offline mode is on" in err and "hf_TEST_secret" not in err and "Traceback" not in err
    assert sorted(p.relative_to(trained.run) for p in trained.run.rglob("*")) == before


@pytest.mark.train
def test_push_refuses_a_bad_repo_name(trained, fake_hub):
    from lora_gui.hub import push_to_hub

    with pytest.raises(LoraGuiError, match="not a Hub repo name"):
        push_to_hub(trained.run, "me/my lora/x", token="t")
    assert fake_hub.calls == []


# ---- other families ----------------------------------------------------------------------------
# Flux.2 dev's files are klein's (families/flux2_dev.py subclasses it), Flux.1 Kontext's are Flux.1's (the same
# transformer and names): klein's and Flux.1's runs check them, in less time.
@pytest.fixture(scope="module", params=[name for name in REGISTRY if name not in ("sd15", "flux2-dev", "flux-kontext")])
def trained_family(request, tiny_models, tmp_path_factory) -> SimpleNamespace:
    """A short run with the text encoders trained where the family trains them (SDXL has two), and its
    in-memory image."""
    from lora_gui.families import get_family

    family = request.param
    root = tmp_path_factory.mktemp(f"formats-{family}")
    photos = write_demo_dataset(root / "photos", count=4, size=(96, 96))
    config = quick_config(
        tiny_models(family),
        photos,
        max_steps=3,
        rank=4,
        alpha=8,
        train_text_encoder=get_family(family).trains_text_encoders,
    )
    trained = train_and_picture(config, root / "run")
    return SimpleNamespace(family=family, model=tiny_models(family), run=root / "run", image=trained)


# The diffusers names of Flux.1's layers that ComfyUI maps onto its own (comfy/utils.py, flux_to_diffusers, which
# comfy/lora.py's model_lora_keys_unet prefixes with "transformer." for Flux models), transcribed from its code.
# The same function maps Flux.2's (ComfyUI's Flux2 is a Flux): its MLPs' linear_in / linear_out and, under "# Flux 2",
# the single blocks' fused attn.to_qkv_mlp_proj and attn.to_out.
COMFY_FLUX_LAYERS = re.compile(
    r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(_context)?\.linear"
    r"|ff(_context)?\.(net\.(0\.proj|2)|linear_(in|out)))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_qkv_mlp_proj|to_out)|proj_mlp|proj_out|norm\.linear)"
    r"|proj_out|x_embedder|context_embedder|norm_out\.linear|time_text_embed\.\w+\.linear_[12]"
)
# The diffusers names of Z-Image's layers that ComfyUI maps onto its own (comfy/utils.py, z_image_to_diffusers, which
# comfy/lora.py's model_lora_keys_unet prefixes with "transformer." and "diffusion_model." for its Lumina2 models, q, k
# and v onto their slices of the fused qkv), transcribed from its code (see families/zimage.py).
COMFY_ZIMAGE_LAYERS = re.compile(
    r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_[qkv]|to_out\.0)|feed_forward\.w[123]"
    r"|adaLN_modulation\.0)"
    r"|all_x_embedder\.2-1|all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|cap_embedder\.1|t_embedder\.mlp\.[02]"
)
# ComfyUI's Chroma is a Flux too (comfy/model_base.py: class Chroma(Flux)): the same map, prefixed alike.
COMFY_LAYERS = {
    "flux": COMFY_FLUX_LAYERS,
    "flux2-klein": COMFY_FLUX_LAYERS,
    "zimage": COMFY_ZIMAGE_LAYERS,
    "chroma": COMFY_FLUX_LAYERS,
}
# The linear layers of ComfyUI's Qwen-Image model (comfy/ldm/qwen_image/model.py: its blocks' img_mod / txt_mod, the
# joint attention's two streams, FeedForward's net.0.proj and net.2; the embedders and the last layer), transcribed
# from its code; comfy/lora.py's model_lora_keys_unet maps "lora_unet_" + each name with "." as "_" onto it.
COMFY_QWEN_IMAGE_LAYERS = re.compile(
    r"transformer_blocks\.\d+\.((img|txt)_mod\.1|attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
    r"|(img|txt)_mlp\.net\.(0\.proj|2))"
    r"|img_in|txt_in|time_text_embed\.timestep_embedder\.linear_[12]|norm_out\.linear|proj_out"
)
COMFY_KOHYA_LAYERS = {"qwen-image": COMFY_QWEN_IMAGE_LAYERS}
# What ComfyUI's LoRA loader reads for each of them (comfy/weight_adapter/lora.py: "<name>.lora_B.weight" with
# "<name>.lora_A.weight"; comfy/lora.py: "<name>.alpha", divided by the rank).
COMFY_SUFFIXES = ("lora_A.weight", "lora_B.weight", "alpha")


@pytest.mark.train
def test_the_file_for_a1111_forge_and_comfyui_names_layers_they_load(trained_family):
    from lora_gui.families import get_family

    family = get_family(trained_family.family)
    pipe = fresh_pipe(trained_family.model)
    tensors, metadata = read(trained_family.run / "run.safetensors")
    if family.kohya_module_names:
        # The denoiser's layers, only those of ComfyUI's own model where it names them as diffusers does.
        comfy = COMFY_KOHYA_LAYERS.get(trained_family.family, re.compile(".+"))
        layers = [name for name, _ in family.denoiser(pipe).named_modules() if comfy.fullmatch(name)]
        names = {"lora_unet_" + name.replace(".", "_") for name in layers}
        for attribute, prefix in zip(family.text_encoder_names, family.kohya_text_encoder_prefixes, strict=True):
            encoder = getattr(pipe, attribute)
            for name, _ in encoder.named_modules():
                canonical = name if name.startswith("text_model") or not name else "text_model." + name
                names.add(f"{prefix}_" + canonical.replace(".", "_"))
        modules = {key.partition(".")[0] for key in tensors}
        assert modules and modules <= names, sorted(modules - names)[:5]
        for prefix in family.kohya_text_encoder_prefixes if family.trains_text_encoders else ():
            assert any(module.startswith(f"{prefix}_text_model_encoder_layers_") for module in modules), prefix
    else:  # Flux.1, Flux.2, Z-Image: diffusers' names, as ComfyUI maps them, each with the tensors its loader reads
        layers = {name for name, _ in pipe.transformer.named_modules()}
        by_layer: dict[str, set[str]] = {}
        for key in tensors:
            component, _, rest = key.partition(".")
            suffix = next(s for s in COMFY_SUFFIXES if rest.endswith("." + s))
            by_layer.setdefault(rest[: -len(suffix) - 1], set()).add(suffix)
            assert component == "transformer", key
        # Z-Image's scale is in its up weights (Family.kohya_alpha_folded): ComfyUI then reads it at scale 1.
        suffixes = set(COMFY_SUFFIXES) - ({"alpha"} if family.kohya_alpha_folded else set())
        assert by_layer and all(found == suffixes for found in by_layer.values())
        comfy = COMFY_LAYERS[trained_family.family]
        assert all(comfy.fullmatch(layer) and layer in layers for layer in by_layer), sorted(by_layer)
        assert any(layer.startswith(("single_transformer_blocks.", "noise_refiner.")) for layer in by_layer)
    assert metadata["ss_base_model_version"] == family.kohya_base_model_version
    assert metadata["ss_network_module"] == family.kohya_network_module
    assert metadata["modelspec.architecture"] == family.modelspec_architecture
    flow = {name: None for name in ("flux", "zimage", "flux2-klein", "chroma", "qwen-image")}
    expected_prediction = {"sd2": "v", **flow}.get(trained_family.family, "epsilon")
    assert metadata.get("modelspec.prediction_type") == expected_prediction


@pytest.mark.train
def test_a_lora_for_the_512_px_sd2_base_is_labelled_as_one(tiny_models, tmp_path):
    """SD 2's 512 px base predicts noise, not velocity: modelspec has its own architecture name for it."""
    # The tiny SD 2 predicts velocity like the 768 px models; this one is the 512 px base's twin.
    model = tmp_path / "sd2-base"
    shutil.copytree(tiny_models("sd2"), model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "epsilon"}))
    photos = write_demo_dataset(tmp_path / "photos", count=2, size=(64, 64))
    train(quick_config(model, photos, max_steps=1), tmp_path / "run")
    _, metadata = read(tmp_path / "run" / "run.safetensors")
    assert metadata["ss_base_model_version"] == "sd_v2"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert metadata["modelspec.prediction_type"] == "epsilon"


@pytest.mark.train
@pytest.mark.parametrize("name", ["pytorch_lora_weights.safetensors", "run.safetensors"])
def test_both_files_of_every_family_give_the_trained_models_image(trained_family, name):
    pipe = fresh_pipe(trained_family.model)
    pipe.load_lora_weights(trained_family.run, weight_name=name)
    np.testing.assert_allclose(image(pipe), trained_family.image, atol=1e-4)
