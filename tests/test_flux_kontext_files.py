"""Flux.1 Kontext's files from elsewhere: Black Forest Labs' single Kontext file holds the same tensors as Flux.1-dev's,
so nothing in it tells Kontext. It loads as Flux.1 unless the model family says Kontext; then as Kontext, its
transformer from the file and the rest from the download cache's FLUX.1-Kontext-dev."""

from __future__ import annotations

import pytest
import torch
from helpers.flux_files import bfl_checkpoint
from helpers.hub import in_download_cache
from helpers.pipes import fresh_pipe

from lora_gui.base_models import load_pipeline
from lora_gui.families.flux_kontext import KONTEXT_DEV

pytestmark = pytest.mark.train


def test_the_single_kontext_file_loads_as_kontext_when_the_family_says_so(tiny_models, tmp_path, download_cache):
    model = tiny_models("flux-kontext")
    in_download_cache(download_cache, KONTEXT_DEV, model)
    original = fresh_pipe(model)
    path = bfl_checkpoint(original.transformer, tmp_path / "flux1-kontext-dev.safetensors")

    family, pipe = load_pipeline(str(path), "flux-kontext")

    assert family.name == "flux-kontext" and type(pipe).__name__ == "FluxKontextPipeline"
    loaded, expected = pipe.transformer.state_dict(), original.transformer.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[key], expected[key]) for key in expected)
