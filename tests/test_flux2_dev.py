"""Flux.2 dev against its own pipeline: the training step's prediction is the pipeline's transformer call, with the
captions read as the pipeline reads them and the guidance input training gives; previews and Generate decode the
pipeline's latents as it would. (Black Forest Labs' checkpoints and other tools' LoRAs: test_flux2_files.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_gui.base_models import load_pipeline
from lora_gui.infer import decode

pytestmark = pytest.mark.train

CAPTIONS = ["a photo of a red circle", "a dog on the beach"]


@torch.no_grad()
def test_dev_trains_on_the_pipelines_own_prediction_with_guidance_one_and_decodes_its_latents(tiny_models):
    family, pipe = load_pipeline(str(tiny_models("flux2-dev")))
    pipe.set_progress_bar_config(disable=True)
    assert family.name == "flux2-dev"
    assert family.generation_defaults(pipe) == (50, 4.0)  # the pipeline's own defaults

    # The captions as the pipeline encodes them: its system message, chat template, Mistral's layers 10, 20 and 30.
    length = pipe.tokenizer.model_max_length
    ours = family.encode(family.text_encoders(pipe), family.tokenize(pipe, CAPTIONS), torch.device("cpu"))
    embeds, text_ids = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=length)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)

    # The prediction: the pipeline's packing, position ids and transformer call, at training's guidance 1.
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 128, 4, 4, generator=generator)
    timesteps = torch.tensor([300.0, 700.0])
    predicted = family.predict(pipe.transformer, noisy, timesteps, ours, [])
    image_ids = pipe._prepare_latent_ids(noisy)

    def pipelines(guidance: torch.Tensor | None) -> torch.Tensor:
        output = pipe.transformer(
            hidden_states=pipe._pack_latents(noisy),
            timestep=timesteps / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        return pipe._unpack_latents_with_ids(output, image_ids)

    torch.testing.assert_close(predicted, pipelines(torch.ones(2)))
    assert (predicted - pipelines(torch.full((2,), 4.0))).abs().max() > 1e-3, "the guidance input counts"
    assert (predicted - pipelines(None)).abs().max() > 1e-3, "without guidance the embedder is skipped"

    # Previews: the prompt's embeddings alone (no negative prompt), and the latents the pipeline returns decoded as
    # it decodes them itself.
    embeddings = family.prompt_embeddings(pipe, "a red circle", torch.device("cpu"))
    assert embeddings.keys() == {"prompt_embeds"}
    options = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=length)
    latents = pipe(**embeddings, **options, generator=torch.Generator().manual_seed(1), output_type="latent").images
    ours_picture = np.asarray(decode(family, pipe, latents, 64, 64)[0], dtype=float)
    theirs = pipe(prompt="a red circle", **options, generator=torch.Generator().manual_seed(1), output_type="pil")
    np.testing.assert_allclose(ours_picture, np.asarray(theirs.images[0], dtype=float), atol=1)
