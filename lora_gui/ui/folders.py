"""A visitor's own folders on the server: their runs and their staged pictures, and whether there is room for one
more run of theirs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_gui.errors import LoraGuiError
from lora_gui.limits import Limits, check_free_disk, check_queue, check_runs_waiting
from lora_gui.owners import EVERYONE, Visitor
from lora_gui.runs import RunFolder, RunSummary, check_run_name, list_runs
from lora_gui.staging import Staging
from lora_gui.ui.engine import Engine


@dataclass
class Folders:
    """The runs folder as each visitor may see it: another visitor's run gets the answer a missing run gets."""

    runs_dir: Path
    limits: Limits  # what one visitor may use (limits.py)
    engine: Engine  # whose runs are queued or training

    def run(self, name: str, visitor: Visitor = EVERYONE) -> RunFolder:
        """The folder of a run picked in the page, if `visitor` may see it; the name is checked, so it can't point
        elsewhere. Another visitor's run gets the same answer as a run that does not exist."""
        run = RunFolder(self.runs_dir / check_run_name(name or ""))
        if not run.path.is_dir() or not visitor.owns_folder(run.path):
            raise LoraGuiError(f"there is no run named {name} (was it deleted?)")
        return run

    def runs_of(self, visitor: Visitor) -> list[RunSummary]:
        """`visitor`'s runs, newest first."""
        return list_runs(self.runs_dir, include=visitor.owns_folder)

    def staging(self, session: str, visitor: Visitor) -> Staging:
        """The visitor's staged pictures (a new folder of theirs when the page has none yet), within this server's
        limits."""
        staging = Staging.for_session(self.runs_dir, session, visitor)
        staging.limits = self.limits
        return staging

    def staged(self, session: str, visitor: Visitor) -> Staging | None:
        """The visitor's staged pictures if the page has a folder of theirs, within this server's limits."""
        staging = Staging.find(self.runs_dir, session, visitor)
        if staging is not None:
            staging.limits = self.limits
        return staging

    def check_room_for_a_run(self, visitor: Visitor) -> None:
        """Refuses one more run of a visitor who has as many queued or training as this server allows, and any run
        when the disk is too full for its checkpoints."""
        waiting = [job for job in self.engine.jobs.jobs() if not job.done.is_set()]
        # All the ids the visitor holds: a signed-in visitor's account and the anonymous id their browser keeps.
        check_runs_waiting(sum(visitor.owns(job.owner) for job in waiting), self.limits)
        check_queue(len(waiting), self.limits)
        check_free_disk(self.runs_dir, self.limits)
