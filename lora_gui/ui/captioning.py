"""Captions written by a captioning model for a visitor's staged pictures: a pass over them all, told as it goes,
or one picture's; on the GPU when it is captioning's to take (gpu_owner.py), else on the processor."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.captioning import ensure_tiny_captioner, load_captioner
from lora_gui.captioning.folder import DRAFT_SIDE, caption_in_background
from lora_gui.data import UnusableImage, open_image
from lora_gui.errors import DataError
from lora_gui.owners import Visitor
from lora_gui.ui.engine import Engine
from lora_gui.ui.model_choices import MODELS_FOLDER, ModelChoices

# The tiny random tagger in the captioner menu: offline, instant, and its tags are random.
TINY_CAPTIONER = "Tiny random tagger: random tags, only for trying the app offline (no download)"
TINY_TAGS = "The tiny random tagger works offline, but its tags are random: it is only for trying the app."


@dataclass
class Captioning:
    """The captioners of the Dataset tab, each pass's Stop, and who has the GPU (the engine's)."""

    runs_dir: Path
    engine: Engine
    models: ModelChoices  # which Hugging Face token a captioner's download goes out with
    _stops: dict[str, threading.Event] = field(default_factory=dict, init=False)

    def in_background(
        self,
        choice: str,
        folder: Path,
        visitor: Visitor,
        *,
        overwrite: bool,
        prefix: str,
        should_stop: Callable[[], bool],
    ) -> Iterator[Any]:
        """A captioning pass over a visitor's pictures with the captioner chosen, told as it goes (see
        captioning.folder.caption_in_background), first why it runs on the processor if a run has the GPU."""
        name, load = self._captioner(choice, visitor)
        gpu = self.engine.jobs.gpu
        yield from caption_in_background(
            name, folder, overwrite=overwrite, prefix=prefix, should_stop=should_stop, gpu=gpu, **load
        )

    def picture(self, choice: str, picture: Path, visitor: Visitor) -> str:
        """One picture's caption by the captioner chosen, which is loaded for it and freed after: on the GPU when
        it is captioning's to take (gpu_owner.py), else on the processor."""
        name, load = self._captioner(choice, visitor)
        try:
            image = open_image(picture, draft_side=DRAFT_SIDE)
        except UnusableImage as problem:
            raise DataError(f"{picture.name} can't be captioned: {problem}") from None
        with self.engine.jobs.gpu.captioning_turn() as turn:
            captioner = load_captioner(name, device=turn.device, **load)
            try:
                return captioner.caption([image])[0]
            finally:
                captioner.close()

    def stop(self, session: str, create: bool = True) -> threading.Event:
        """The Stop of a staging folder's captioning: a fresh one for each pass."""
        if create or session not in self._stops:
            self._stops[session] = threading.Event()
        return self._stops[session]

    def _captioner(self, choice: str, visitor: Visitor) -> tuple[str, dict[str, Any]]:
        """The registry name and how to load it, but for the device: the GPU's owner gives that for each pass."""
        if choice == TINY_CAPTIONER:
            return "wd-tagger", {"source": ensure_tiny_captioner(self.runs_dir / MODELS_FOLDER / "tiny-wd-tagger")}
        return choice, {"token": self.models.hub_token(None, visitor)}
