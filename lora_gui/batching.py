"""Batching a run's pictures: aspect-ratio buckets, the batches of every step, the pictures held out of them.

Everything here is a pure function of the seed, the pictures' sizes and their names, so a resumed run sees exactly
the batches, and holds out exactly the pictures, it would have without the stop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lora_gui.families import ImageGeometry

if TYPE_CHECKING:
    from lora_gui.data import Example


# ---- aspect-ratio buckets ----------------------------------------------------------------------
def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes of about resolution² pixels, both multiples of `step`."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = step
    while width <= resolution * max_ratio:
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= max_ratio:
            sizes.update({(width, height), (height, width)})
        width += step
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose shape is closest to the image's (closest log aspect ratio, then largest)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, ImageGeometry]:
    """Scale the image to cover the bucket, then center-crop it to exactly the bucket's size."""
    width, height = image.size
    target_w, target_h = bucket
    scale = max(target_w / width, target_h / height)
    resized_w, resized_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    resized = image.resize((resized_w, resized_h), resample)
    left, top = (resized_w - target_w) // 2, (resized_h - target_h) // 2
    cropped = resized.crop((left, top, left + target_w, top + target_h))
    return cropped, ImageGeometry(
        original_size=(height, width), crop_top_left=(top, left), target_size=(target_h, target_w)
    )


def stretched_before(before: Image.Image, after_size: tuple[int, int]) -> Image.Image:
    """An edit pair's "before" picture at its "after" picture's size (width, height), so that fitting both to their
    bucket cuts them at the same place."""
    return before.resize(after_size, Image.Resampling.LANCZOS)


def assign_buckets(examples: list[Example], resolution: int, step: int, aspect_buckets: bool) -> list[tuple[int, int]]:
    """The bucket of each example: its nearest shape, or the square when buckets are off."""
    if not aspect_buckets:
        return [(resolution, resolution)] * len(examples)
    buckets = bucket_sizes(resolution, step)
    return [nearest_bucket(example.size, buckets) for example in examples]


def image_to_tensor(image: Image.Image):
    """HWC uint8 -> CHW float in [-1, 1], as the VAE expects."""
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class BatchOrder:
    """The images of the n-th batch of a run, as a pure function of (seed, n).

    Each epoch shuffles the images within their buckets, cuts each bucket into batches and
    shuffles the batches, so every batch holds images of one size. Because the order depends on
    nothing but the seed, a resumed run continues with exactly the batches it would have seen.
    """

    def __init__(
        self, buckets: list[tuple[int, int]], batch_size: int, seed: int, held_out: Collection[int] = frozenset()
    ):
        # `held_out`: the images measured for the validation loss, never put in a batch.
        self.buckets, self.batch_size, self.seed, self.held_out = buckets, batch_size, seed, frozenset(held_out)
        self.batches_per_epoch = len(self._epoch(0))
        self._current: tuple[int, list[list[int]]] = (0, self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            if index not in self.held_out:
                by_bucket.setdefault(bucket, []).append(index)
        batches = []
        for indices in by_bucket.values():
            rng.shuffle(indices)
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __call__(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.batches_per_epoch)
        if self._current[0] != epoch:
            self._current = (epoch, self._epoch(epoch))
        return self._current[1][position]


# ---- validation pictures -----------------------------------------------------------------------
# Fewer pictures than this can't spare any for validation: each one held out is a sizeable part of what the LoRA
# learns from. At most a quarter of a set is held out.
MIN_PICTURES_TO_HOLD_OUT = 8


def hold_out(examples: list[Example], count: int, seed: int) -> tuple[list[int], str]:
    """Which of the run's pictures (by index) to hold out of training for the validation loss, and a sentence
    saying what was done. A pure function of the seed and the pictures' names, so a resumed run holds out the
    same ones."""
    if not count:
        return [], ""
    if len(examples) < MIN_PICTURES_TO_HOLD_OUT:
        return [], (
            f"No validation: {len(examples)} pictures are too few to hold any out (it takes "
            f"{MIN_PICTURES_TO_HOLD_OUT} or more), so every picture trains. Add pictures, or give a folder of "
            "validation pictures instead."
        )
    kept = min(count, len(examples) // 4)
    names = sorted(range(len(examples)), key=lambda index: examples[index].caption_source)
    chosen = sorted(random.Random(f"{seed}-validation").sample(names, kept))
    listed = ", ".join(examples[index].caption_source for index in chosen)
    what = "pairs" if any(example.control is not None for example in examples) else "pictures"  # an edit's
    fewer = f" (at most a quarter of the {len(examples)} {what}, not {count})" if kept < count else ""
    return chosen, f"Validation on {kept} held-out {what}{fewer}, never trained on: {listed}"
