"""Edit LoRAs learn from before/after pairs: each training picture is the "after" half, its "before" picture named as
it in another folder (or in a Hub dataset's column), the caption the instruction. Pairs match by name in any picture
format; what has no partner, and pairs of another shape, are said in sentences; a run keeps both halves (dataset/ and
control/); training keeps each pair together (one bucket, one crop, one flip) and reads the "before" picture as the
editing model's pipeline does."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import quick_config
from PIL import Image, ImageDraw

from lora_gui.batching import fit_to_bucket
from lora_gui.cache import cache_latents
from lora_gui.data import Example, scan_folder
from lora_gui.errors import ConfigError, DataError
from lora_gui.families import get_family
from lora_gui.run_dataset import copy_into_run, pair_with_controls, scan_source
from lora_gui.training import train


def picture(size: tuple[int, int], left_half: tuple[int, int, int] = (200, 40, 40)) -> Image.Image:
    """A picture whose left half is coloured and right half gray: a flip or a shifted crop shows."""
    image = Image.new("RGB", size, (128, 128, 128))
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2 - 1, size[1]), fill=left_half)
    return image


def write_pairs(root: Path, names: dict[str, tuple[str, tuple[int, int]]]) -> tuple[Path, Path]:
    """after/<name>.png with a caption, and before/<name><suffix> at its size: name -> (suffix, before size)."""
    after, before = root / "after", root / "before"
    for name, (suffix, size) in names.items():
        for folder in (after, before):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        picture((96, 96)).save(after / f"{name}.png")
        (after / f"{name}.txt").write_text("make it blue", encoding="utf-8")
        if suffix:
            picture(size, (40, 40, 200)).save(before / f"{name}{suffix}")
    return after, before


@pytest.mark.unit
def test_pairs_match_by_name_in_any_format_and_what_has_no_partner_is_said(tmp_path):
    after, before = write_pairs(
        tmp_path,
        {"a": (".jpg", (96, 96)), "sub/b": (".png", (48, 48)), "c": ("", (0, 0)), "wide": (".webp", (192, 96))},
    )
    picture((64, 64)).save(before / "stray.png")
    (before / "broken.png").write_bytes(b"not a picture")
    picture((96, 96)).save(after / "broken.png")
    (after / "broken.txt").write_text("make it blue", encoding="utf-8")

    scan = pair_with_controls(scan_folder(after), before)

    assert {e.relpath: e.control.relative_to(before).as_posix() for e in scan.examples} == {
        "a.png": "a.jpg",
        "sub/b.png": "sub/b.png",
        "wide.png": "wide.webp",
    }, "a before picture of another format or size is a partner; a picture half the size is the same shape"
    reasons = {s.name: s.reason for s in scan.skipped}
    assert reasons["c.png"] == "no before picture (none named c.* among the before pictures)"
    assert reasons["broken.png"].startswith("its before picture can't be used: not an image file")
    assert scan.unpaired_controls == ["stray.png"]
    assert scan.reshaped_pairs == ["wide.png: before 192x96, after 96x96"]
    with pytest.raises(DataError, match=r"folder of before pictures .* does not exist"):
        pair_with_controls(scan_folder(after), tmp_path / "nowhere")


@pytest.mark.unit
def test_a_run_keeps_both_halves_of_each_pair_and_reads_them_back_as_pairs(tmp_path):
    after, before = write_pairs(tmp_path, {"a": (".jpg", (96, 96)), "b": (".png", (96, 96))})
    scan = scan_source(str(after), control_data=str(before))
    copy_into_run(scan, tmp_path / "run/dataset", control_dir=tmp_path / "run/control")

    assert sorted(p.name for p in (tmp_path / "run/control").iterdir()) == ["a.jpg", "b.png"]
    again = pair_with_controls(scan_folder(tmp_path / "run/dataset"), tmp_path / "run/control")
    assert [(e.relpath, e.control.name) for e in again.examples] == [("a.png", "a.jpg"), ("b.png", "b.png")]


@pytest.mark.unit
def test_a_hugging_face_dataset_with_a_column_of_before_pictures_gives_pairs(tmp_path):
    import datasets

    def cell(image: Image.Image) -> dict:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    table = datasets.Dataset.from_dict(
        {
            "image": [cell(picture((96, 96))), cell(picture((96, 96)))],
            "control_image": [cell(picture((96, 96), (0, 0, 255))), {"bytes": b"junk", "path": None}],
            "text": ["make it red", "make it red"],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "control_image": datasets.Image(), "text": datasets.Value("string")}
        ),
    )
    repo = tmp_path / "hub-dataset"
    (repo / "data").mkdir(parents=True)
    table.to_parquet(repo / "data/train-00000-of-00001.parquet")

    scan = scan_source(str(repo))
    assert [e.relpath for e in scan.examples] == ["000000.png"]
    assert scan.skipped[0].name == "row 1" and scan.skipped[0].reason.startswith("not an image")
    copy_into_run(scan, tmp_path / "run/dataset", control_dir=tmp_path / "run/control")
    control = Image.open(tmp_path / "run/control/000000.png").convert("RGB")
    assert control.getpixel((10, 10)) == (0, 0, 255), "the before picture is the control column's"
    with pytest.raises(DataError, match="column"):
        scan_source(str(repo), control_data=str(tmp_path))


@pytest.mark.train
def test_each_pair_is_cached_together_one_bucket_one_crop_one_flip(tiny_models, tmp_path):
    """A wide "before" picture of a square pair is stretched to the square before the crop, so both halves show the
    same place; the mirrored pair mirrors both."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_models("flux-kontext"))
    family = get_family("flux-kontext")
    after, before = tmp_path / "after.png", tmp_path / "before.png"
    picture((96, 64)).save(after)
    picture((192, 64), (40, 40, 200)).save(before)  # the same scene, twice as wide
    example = Example(path=after, caption="make it blue", size=(96, 64), control=before)

    cache = cache_latents(family, pipe.vae, [example], [(64, 32)], True, torch.device("cpu"))

    def encoded(image: Image.Image) -> torch.Tensor:
        fitted, _ = fit_to_bucket(image, (64, 32))
        pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        return pipe.vae.encode(pixels).latent_dist.mean[0]

    with torch.no_grad():
        stretched = Image.open(before).convert("RGB").resize((96, 64), Image.Resampling.LANCZOS)
        assert torch.allclose(cache.references[0], encoded(stretched), atol=1e-5)
        mirrored = stretched.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert torch.allclose(cache.references[1], encoded(mirrored), atol=1e-5)
    reference = cache.reference([0], [True], torch.device("cpu"))
    assert torch.allclose(reference, family.latents_for_denoiser(pipe.vae, cache.references[1][None]))


@pytest.mark.train
def test_an_editing_model_without_pairs_and_pairs_on_a_text_to_image_model_are_refused(tiny_models, photos, tmp_path):
    with pytest.raises(ConfigError, match="learns edits from before/after pairs: give the before pictures"):
        train(quick_config(tiny_models("flux-kontext"), photos, control_data="", max_steps=1), tmp_path / "a")
    with pytest.raises(ConfigError, match="makes pictures from text alone: before/after pairs train an editing"):
        train(quick_config(tiny_models("flux"), photos, control_data=str(photos), max_steps=1), tmp_path / "b")


@pytest.mark.train
def test_kontexts_training_prediction_is_the_pipelines_transformer_call_with_the_before_picture(tiny_models):
    """The before picture's latents as the cache keeps them, joined as FluxKontextPipeline joins its picture to edit
    (its own prepare_latents: the packing, the ids with their first coordinate 1, the order) and the prediction cut
    to the noisy latents' own patches."""
    from diffusers import FluxKontextPipeline

    kontext, pipe = get_family("flux-kontext"), FluxKontextPipeline.from_pretrained(tiny_models("flux-kontext"))
    before = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    timesteps = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        reference = kontext.latents_for_denoiser(pipe.vae, pipe.vae.encode(before).latent_dist.mean)
        noisy = torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))
        count, channels, height, width = noisy.shape
        conditioning = kontext.encode(
            kontext.text_encoders(pipe), kontext.tokenize(pipe, ["make it blue", "a dog"]), torch.device("cpu")
        )
        conditioning["reference_latents"] = reference
        ours = kontext.predict(pipe.transformer, noisy, timesteps, conditioning, [])

        packed = pipe._pack_latents(noisy, count, channels, height, width)
        latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
            before, count, channels, 32, 64, torch.float32, torch.device("cpu"), None, packed
        )
        prediction = pipe.transformer(
            hidden_states=torch.cat([latents, image_latents], dim=1),
            timestep=timesteps / 1000,
            guidance=torch.full((2,), 1.0),
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=conditioning["prompt_embeds"],
            txt_ids=torch.zeros(conditioning["prompt_embeds"].shape[1], 3),
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
            return_dict=False,
        )[0][:, : latents.shape[1]]
        expected = pipe._unpack_latents(prediction, 32, 64, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.train
def test_flux2_kleins_training_prediction_is_the_pipelines_transformer_call_with_a_reference_picture(tiny_models):
    """Flux.2 makes pictures from text and edits with the same weights: with a pair's "before" picture, its latents
    (patchified and normalized as the noisy ones) are joined as Flux2KleinPipeline joins a reference picture (its own
    prepare_image_latents: the packing, the ids' first coordinate 10, the order), the prediction cut to the noisy
    patches."""
    from diffusers import Flux2KleinPipeline

    klein, pipe = get_family("flux2-klein"), Flux2KleinPipeline.from_pretrained(tiny_models("flux2-klein"))
    before = torch.rand(1, 3, 64, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    timesteps = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        reference = klein.latents_for_denoiser(pipe.vae, pipe.vae.encode(before).latent_dist.mean).expand(2, -1, -1, -1)
        noisy = torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))
        captions = ["make it blue", "a dog"]
        conditioning = klein.encode(klein.text_encoders(pipe), klein.tokenize(pipe, captions), torch.device("cpu"))
        conditioning["reference_latents"] = reference
        ours = klein.predict(pipe.transformer, noisy, timesteps, conditioning, [])

        image_latents, image_ids = pipe.prepare_image_latents([before], 2, None, torch.device("cpu"), torch.float32)
        latent_ids, text = pipe._prepare_latent_ids(noisy), conditioning["prompt_embeds"]
        prediction = pipe.transformer(
            hidden_states=torch.cat([pipe._pack_latents(noisy), image_latents], dim=1),
            timestep=timesteps / 1000,
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=pipe._prepare_text_ids(text),
            img_ids=torch.cat([latent_ids, image_ids], dim=1),
            return_dict=False,
        )[0][:, : latent_ids.shape[1]]
        expected = pipe._unpack_latents_with_ids(prediction, latent_ids, *noisy.shape[2:])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    plain = dict(conditioning, reference_latents=None)
    assert not torch.allclose(klein.predict(pipe.transformer, noisy, timesteps, plain, []), ours, atol=1e-3)


@pytest.mark.unit
def test_an_edit_run_holds_out_pairs_and_says_so(tmp_path):
    from lora_gui.batching import hold_out

    after, before = write_pairs(tmp_path, {f"p{index}": (".png", (96, 96)) for index in range(8)})
    pairs = pair_with_controls(scan_folder(after), before).examples
    chosen, note = hold_out(pairs, 2, seed=0)
    assert len(chosen) == 2 and note.startswith("Validation on 2 held-out pairs, never trained on: ")
    assert hold_out(scan_folder(after).examples, 2, seed=0)[1].startswith("Validation on 2 held-out pictures")
