"""Who has the GPU now: a training run, captioning or the Generate tab, one at a time.

The app has three users of one GPU, and any two of them side by side can run it out of memory: a 12 GB Flux run
beside Florence-2, or Generate's 7 GB SDXL pipeline beside either. `GpuOwner` is the one place that knows which of
them holds it, and each asks it before putting anything there:

- a run (jobs.py) has the GPU first. It waits for a captioning pass that holds the GPU to end, and says so in its
  log (a pass is minutes at most, and Stop ends it; moving it to the processor halfway would mean loading the
  captioner again there, slower, for the pictures left). Then Generate steps aside: its model is unloaded once the
  picture being made is done.
- captioning starts on the GPU unless a run holds it or waits for it (then it runs on the processor and says so,
  so that a stream of passes can't keep a run waiting); Generate steps aside for it too, since Generate keeps its
  model loaded between clicks and would otherwise keep captioning off the GPU for good. Passes may share the GPU
  with each other: a captioner takes a GB or two.
- Generate loads a model only while neither holds the GPU; otherwise it is told why in a sentence that never names
  the run (on a shared Space it may be a stranger's).

Its own module rather than a part of jobs.py: captioning and Generate (infer.py) ask it too, and neither should
import the trainer. Only where there is a GPU (`devices.card()`): on a CPU nothing waits and nothing is refused (the
tiny demo trains, captions and generates side by side), though Generate's model still leaves when a run starts, for
the run's memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lora_gui import devices

RUN = "a run"
CAPTIONING = "captioning"
GENERATE = "Generate"
RUN_HAS_THE_GPU = "A run is training on the GPU, so captioning runs on the processor (slower)."
CAPTIONING_HAS_THE_GPU = (
    "Captioning is using the GPU: this run starts once that pass ends, so the two never share its memory"
)
GENERATE_WAITS_FOR_RUN = (
    "a run is training on the GPU and needs its memory: Generate works again once it ends. Wait for it, or stop it "
    "in the Train tab if it is yours (a stopped run keeps a usable LoRA)"
)
GENERATE_WAITS_FOR_CAPTIONING = (
    "pictures are being captioned on the GPU: Generate works again once that pass ends. Wait for it, or stop it in "
    "the Dataset tab if it is yours"
)
_STOP_LOOKS_EVERY_S = 0.5  # how often a run waiting for the GPU looks whether it was stopped


@dataclass(frozen=True)
class CaptioningTurn:
    """Where a captioner loads for its pass: the GPU's device, or the processor with the sentence saying why."""

    device: str
    why: str = ""


class GpuOwner:
    """The holder of the GPU now, and the turns runs, captioning and Generate take on it (see the module)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._run = False  # a run holds the GPU, or waits for captioning to hand it over
        self._captioning = 0  # captioning passes holding the GPU
        self._generate = False  # Generate may have a model on the GPU
        # Generate's way of stepping aside (infer.GeneratorCache.release): it waits for a picture being made, frees
        # the model, and returns a sentence saying so if there was one. Called without `_changed` held, since it
        # waits for Generate's own lock, under which Generate asks this owner for the GPU.
        self.generate_steps_aside: Callable[[], str | None] = lambda: None

    @property
    def holder(self) -> str | None:
        """Who has the GPU now: RUN (holding it or about to), CAPTIONING, GENERATE, or None."""
        with self._changed:
            return RUN if self._run else CAPTIONING if self._captioning else GENERATE if self._generate else None

    # ---- a training run -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def run_turn(self, tell: Callable[[str], None], should_stop: Callable[[], bool]) -> Iterator[bool]:
        """The GPU for a run's block: True once captioning has handed it over (`tell` hears why the run waits) and
        Generate stepped aside (its sentence told); False if the run was stopped while it waited."""
        with self._changed:
            self._run = True  # from now on captioning starts on the processor and Generate is refused
            told = False
            while self._captioning and not should_stop():
                if not told:
                    tell(CAPTIONING_HAS_THE_GPU)
                    told = True
                self._changed.wait(_STOP_LOOKS_EVERY_S)
            has_it = not self._captioning
        try:
            if has_it:
                freed = self.generate_steps_aside()
                if freed:
                    tell(freed)
            yield has_it
        finally:
            with self._changed:
                self._run = False
                self._changed.notify_all()

    # ---- captioning ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def captioning_turn(self) -> Iterator[CaptioningTurn]:
        """Where a captioning pass (or one picture's caption) runs for the block: the GPU, unless a run holds it or
        waits for it; held until the block ends."""
        gpu = devices.card()
        if gpu is None:
            yield CaptioningTurn("cpu")
            return
        with self._changed:
            if self._run:
                has_it = False
            else:
                self._captioning += 1
                has_it = True
        if not has_it:
            yield CaptioningTurn("cpu", RUN_HAS_THE_GPU)
            return
        try:
            self.generate_steps_aside()  # its sentence speaks to a run; captioning only needs the memory
            yield CaptioningTurn(str(gpu.device))
        finally:
            with self._changed:
                self._captioning -= 1
                self._changed.notify_all()

    # ---- Generate -----------------------------------------------------------------------------------
    def claim_for_generate(self) -> str | None:
        """None once Generate may load a model on the GPU; else the sentence why not (a run or captioning has it).
        Generate then holds it until it steps aside (`generate_stepped_aside`)."""
        if devices.card() is None:
            return None
        with self._changed:
            if self._run:
                return GENERATE_WAITS_FOR_RUN
            if self._captioning:
                return GENERATE_WAITS_FOR_CAPTIONING
            self._generate = True
            return None

    def generate_stepped_aside(self) -> None:
        with self._changed:
            self._generate = False
