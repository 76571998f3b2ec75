"""The engine's heavy half, loaded apart from the page: the runs' JobManager, Generate's GeneratorCache and the GPU.

Importing torch, diffusers, transformers and peft takes seconds (11 s on a laptop's CPU): the page is built and
answers without them, `launch` loads them on a thread of their own, the page says so while they load, and every
handler that needs them waits here (`jobs`, `generators`, `has_cuda`) until they have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_gui.infer import GeneratorCache
    from lora_gui.jobs import JobManager
    from lora_gui.model_policy import BaseModelPolicy


@dataclass(kw_only=True)
class Engine:
    """The runs and Generate, made once the engine has loaded (or at once from a JobManager given, as tests do)."""

    policy: Callable[[], BaseModelPolicy]  # the base models the runs and Generate load: the page's checks' rule
    given_jobs: JobManager | None = None
    _jobs: JobManager | None = field(default=None, init=False)
    _generators: GeneratorCache | None = field(default=None, init=False)
    _has_cuda: bool = field(default=False, init=False)
    _tflops: float | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        if self.given_jobs is not None:  # torch is imported already: nothing is gained by waiting
            self.load()

    @property
    def loaded(self) -> bool:
        return self._jobs is not None

    def start(self, *, leave_a_core_free: bool = False) -> threading.Thread:
        """Load the engine on a thread of its own, so the page answers meanwhile. `leave_a_core_free`: the app's
        runs compute on all cores but one (devices.leave_a_core_free), set before anything computes."""
        thread = threading.Thread(target=self.load, kwargs={"leave_a_core_free": leave_a_core_free}, daemon=True)
        thread.name = "engine-loader"
        thread.start()
        return thread

    def load(self, *, leave_a_core_free: bool = False) -> None:
        """Import the engine and make the runs' JobManager and Generate's cache; a second caller waits for the
        first, and then finds them made."""
        with self._lock:
            if self._jobs is not None:
                return
            from lora_gui import quiet_ml_libraries

            # Before anything imports diffusers' quantizers, which warn as they load (nothing a user can act on).
            quiet_ml_libraries()
            from lora_gui import devices
            from lora_gui.infer import GeneratorCache
            from lora_gui.jobs import JobManager

            if leave_a_core_free:
                devices.leave_a_core_free()
            jobs = self.given_jobs or JobManager()
            # One user of the GPU at a time (gpu_owner.py): a run waits for captioning there, and Generate's model
            # leaves when a run or captioning takes it; Generate waits while either holds it.
            generators = GeneratorCache(gpu=jobs.gpu)
            # The runs and Generate load what the page's checks let through, by the same rule.
            jobs.model_policy = generators.policy = self.policy()
            self._has_cuda = devices.has_cuda()
            self._generators, self._jobs = generators, jobs

    @property
    def jobs(self) -> JobManager:
        """The runs, queued and training; waits for the engine."""
        self.load()
        assert self._jobs is not None
        return self._jobs

    @property
    def generators(self) -> GeneratorCache:
        """Generate's loaded model; waits for the engine."""
        self.load()
        assert self._generators is not None
        return self._generators

    @property
    def has_cuda(self) -> bool:
        """Whether training runs on a CUDA GPU; waits for the engine."""
        self.load()
        return self._has_cuda

    def is_live(self, run: Path) -> bool:
        """Whether a run is queued or training in this app: none is before the engine has loaded."""
        return self._jobs is not None and self._jobs.live_status(run) is not None

    def gpu_tflops(self) -> float | None:
        """This GPU's measured matrix-multiply rate, for time estimates; measured once, then remembered.

        None without a CUDA GPU, and while a run trains: measuring then would time the run's share too."""
        if self._tflops is None and self.has_cuda and self.jobs.active() is None:
            from lora_gui.devices import matmul_tflops

            self._tflops = matmul_tflops()
        return self._tflops
