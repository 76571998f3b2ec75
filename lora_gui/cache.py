"""Work done once before the loop, so a training step is one UNet forward and backward.

Latents: each image (and its mirror image when random flip is on) goes through the VAE once; the
cache keeps the latent distribution's mean and std, and each step draws a fresh sample from them
exactly as an uncached VAE encode would. An edit pair's "before" picture is encoded with its "after"
picture, fitted to the same bucket (stretched to its shape first) and mirrored with it, and kept as its
mean, which is what the editing pipelines give their reference (`sample_mode="argmax"`). This is
where each picture is decoded, the only time: one whose damage only shows then (a cut-off file whose
end looked whole) is left out, with its reason.
Text: each distinct caption (and the empty caption, for caption dropout) is encoded once, unless
the text encoder is being trained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image

from lora_gui.batching import fit_to_bucket, image_to_tensor, stretched_before
from lora_gui.data import Example, Scan, Skipped, UnusableImage, open_image
from lora_gui.families import Family, ImageGeometry

log = logging.getLogger(__name__)

# Images per VAE call: 4 at 512 px, 1 from 1024 px, so encoding never needs more memory than training.
ENCODE_PIXELS = 4 * 512 * 512


@dataclass
class LatentCache:
    mean: list[torch.Tensor]  # per image: (C, h, w), and the mirrored image's at [i + n] when flipping
    std: list[torch.Tensor]
    geometry: list[ImageGeometry]
    # The VAE's latents -> the denoiser's (the family's `latents_for_denoiser`): shifted and scaled, and for some
    # families put into patches and normalized per channel. Applied after each draw, as an uncached encode would be.
    for_denoiser: Callable[[torch.Tensor], torch.Tensor]
    has_flips: bool
    kept: list[int]  # the examples cached, by their index in the list given
    skipped: list[Skipped]  # the others: their pixels failed to decode (either picture of a pair)
    # Edit pairs: each "before" picture's latent mean, in the rows of `mean`; None for pictures without pairs.
    references: list[torch.Tensor] | None = None

    def keep(self, items: list) -> list:
        """The items (one per example given) of the examples that were cached, in the cache's order."""
        return [items[index] for index in self.kept]

    def centre(self, index: int, device: torch.device) -> torch.Tensor:
        """One picture's latents as they are (its distribution's mean, unflipped), scaled for the denoiser: no
        draw, so a validation loss measured on them moves only because the LoRA changed. (1, C, h, w)"""
        return self.for_denoiser(self.mean[index].to(device).unsqueeze(0))

    def sample(self, indices: list[int], flips: list[bool], generator: torch.Generator) -> torch.Tensor:
        """Draw latents for a batch (all from one bucket, so they stack), already scaled for the UNet."""
        rows = self._rows(indices, flips)
        mean = torch.stack([self.mean[r] for r in rows]).to(generator.device, non_blocking=True)
        std = torch.stack([self.std[r] for r in rows]).to(generator.device, non_blocking=True)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return self.for_denoiser(mean + std * noise)

    def reference(self, indices: list[int], flips: list[bool], device: torch.device) -> torch.Tensor | None:
        """A batch's "before" pictures (flipped as their "after" pictures are), scaled for the denoiser; None
        without pairs."""
        if self.references is None:
            return None
        rows = self._rows(indices, flips)
        return self.for_denoiser(torch.stack([self.references[r] for r in rows]).to(device, non_blocking=True))

    def _rows(self, indices: list[int], flips: list[bool]) -> list[int]:
        """Where each picture of a batch is kept: its own row, or its mirror image's after all the pictures."""
        count = len(self.geometry)
        return [i + count if flip else i for i, flip in zip(indices, flips, strict=True)]


def with_references(conditioning: dict[str, torch.Tensor], references: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The denoiser's conditioning with an edit's "before" pictures (`Family.reference_images`) beside the text's."""
    return conditioning if references is None else {**conditioning, "reference_latents": references}


@torch.no_grad()
def cache_latents(
    family: type[Family],
    vae: AutoencoderKL,
    examples: list[Example],
    buckets: list[tuple[int, int]],
    with_flips: bool,
    device: torch.device,
    progress: Callable[[int, int], None] = lambda done, total: None,
    arriving_bytes: int = 0,
) -> LatentCache:
    """The latent distribution of every picture (and its mirror image), encoded once; with the "before" picture of
    each, for edit pairs (`Example.control`).

    `arriving_bytes` is what training will still move onto the device after caching (the denoiser):
    latents kept on the GPU must leave room for it."""
    paired = any(example.control is not None for example in examples)
    store = _cache_device(vae, device, buckets, with_flips, arriving_bytes, 3 if paired else 2)
    means: list[torch.Tensor | None] = [None] * (len(examples) * (2 if with_flips else 1))
    stds: list[torch.Tensor | None] = [None] * len(means)
    references: list[torch.Tensor | None] = [None] * len(means)
    geometry: list[ImageGeometry | None] = [None] * len(examples)
    skipped: list[Skipped] = []
    # Group by bucket so each VAE call gets images of one size.
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    done = 0
    for bucket, indices in by_bucket.items():
        per_call = max(1, ENCODE_PIXELS // (bucket[0] * bucket[1] * (2 if with_flips else 1) * (2 if paired else 1)))
        for start in range(0, len(indices), per_call):
            chunk = indices[start : start + per_call]
            pixels, rows = _pixels(examples, chunk, bucket, with_flips, geometry, skipped)
            if pixels:
                batch = torch.stack(pixels).to(device, dtype=vae.dtype)
                distribution = family.latent_distribution(vae, batch)
                for row, mean, std in zip(rows, distribution.mean.float(), distribution.std.float(), strict=True):
                    if row < 0:  # a "before" picture: its mean alone
                        references[-row - 1] = mean.to(store)
                    else:
                        means[row], stds[row] = mean.to(store), std.to(store)
            done += len(chunk)
            progress(done, len(examples))
    kept = [index for index, fitted in enumerate(geometry) if fitted is not None]
    if not kept:  # every picture failed to decode: say why, as a scan that finds nothing usable does
        Scan(skipped=skipped).require_some("the run's dataset")
    rows = kept + ([index + len(examples) for index in kept] if with_flips else [])
    return LatentCache(
        mean=[means[row] for row in rows],  # type: ignore[misc]
        std=[stds[row] for row in rows],  # type: ignore[misc]
        geometry=[geometry[index] for index in kept],  # type: ignore[misc]
        for_denoiser=partial(family.latents_for_denoiser, vae),
        has_flips=with_flips,
        kept=kept,
        skipped=skipped,
        references=[references[row] for row in rows] if paired else None,  # type: ignore[misc]
    )


def _pixels(
    examples: list[Example],
    chunk: list[int],
    bucket: tuple[int, int],
    with_flips: bool,
    geometry: list[ImageGeometry | None],
    skipped: list[Skipped],
) -> tuple[list[torch.Tensor], list[int]]:
    """The pictures `chunk` fitted to `bucket` (and their mirror images), each with its row in the cache, and an edit
    pair's "before" picture after its "after" picture, with its row as -1 - row; the geometry of each is filled in,
    and a pair whose picture fails to decode is added to `skipped` instead."""
    pixels, rows = [], []
    for index in chunk:
        example = examples[index]
        try:
            pictures = [open_image(example.path)]
            if example.control is not None:
                pictures.append(stretched_before(open_image(example.control), pictures[0].size))
        except UnusableImage as problem:
            skipped.append(Skipped(example.caption_source, str(problem)))
            log.warning("Skipped %s", skipped[-1])
            continue
        for kind, image in enumerate(pictures):
            image, fitted = fit_to_bucket(image, bucket)
            geometry[index] = geometry[index] or fitted
            row = index if kind == 0 else -1 - index
            pixels.append(image_to_tensor(image))
            rows.append(row)
            if with_flips:
                pixels.append(image_to_tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
                rows.append(row + len(examples) if kind == 0 else row - len(examples))
    return pixels, rows


def _cache_device(
    vae: AutoencoderKL,
    device: torch.device,
    buckets: list[tuple[int, int]],
    with_flips: bool,
    arriving_bytes: int,
    tensors_per_picture: int = 2,
) -> torch.device:
    """Keep the latents on the GPU when they take under a tenth of the memory free for training (what is
    free now, less what will still arrive): a step then copies nothing from the host. Otherwise they
    wait in CPU memory."""
    if device.type != "cuda":
        return torch.device("cpu")
    channels, factor = latent_shape(vae)
    # A mean and a std in fp32 per picture (and per mirror image), and an edit's "before" picture's mean.
    per_picture = [tensors_per_picture * channels * (w // factor) * (h // factor) * 4 for w, h in buckets]
    latent_bytes = sum(per_picture) * (2 if with_flips else 1)
    free, _ = torch.cuda.mem_get_info(device)
    return device if latent_bytes < (free - arriving_bytes) / 10 else torch.device("cpu")


def latent_shape(vae: AutoencoderKL) -> tuple[int, int]:
    """A VAE's latent channels and how many times smaller than the picture its latents are; a video VAE (Qwen's)
    names them otherwise."""
    if hasattr(vae, "spatial_compression_ratio"):
        return vae.config.z_dim, vae.spatial_compression_ratio
    return vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)


class TextConditioning:
    """Caption -> the denoiser's text conditioning.

    Frozen text encoders encode each caption once, when this is made; trained ones (`encoders`, as
    training calls them) encode every batch anew."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        family: type[Family],
        device: torch.device,
        captions: Sequence[str] = (),
        encoders: list[torch.nn.Module] | None = None,
    ):
        self.pipe, self.family, self.device, self.encoders = pipe, family, device, encoders
        self.cached: dict[str, dict[str, torch.Tensor]] = {}
        if encoders is None:
            unique = list(dict.fromkeys(captions))
            with torch.no_grad():
                for start in range(0, len(unique), 16):
                    chunk = unique[start : start + 16]
                    encoded = family.encode(family.text_encoders(pipe), family.tokenize(pipe, chunk), device)
                    for index, caption in enumerate(chunk):
                        self.cached[caption] = {key: value[index] for key, value in encoded.items()}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.encoders is not None:
            return self.family.encode(self.encoders, self.family.tokenize(self.pipe, captions), self.device)
        rows = [self.cached[caption] for caption in captions]
        return {key: torch.stack([row[key] for row in rows]).to(self.device) for key in rows[0]}
