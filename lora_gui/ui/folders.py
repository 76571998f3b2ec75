"""A visitor's own folders on the server: their runs and their staged pictures, and whether there is room for one
more run of theirs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lora_gui.errors import LoraGuiError
from lora_gui.limits import Limits, check_free_disk, check_queue, check_runs_waiting
from lora_gui.owners import EVERYONE, Visitor
from lora_gui.runs import PRIVATE_MARK, RunFolder, RunSummary, check_run_name, list_runs, suggest_run_name
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
        checked = check_run_name(name or "")
        for folder in (self.runs_dir / checked, self.runs_dir / f"{checked}{PRIVATE_MARK}{_tag(visitor)}"):
            if folder.is_dir() and visitor.owns_folder(folder):
                return RunFolder(folder)
        raise LoraGuiError(f"there is no run named {name} (was it deleted?)")

    def new_run(self, name: str, visitor: Visitor) -> Path:
        """Where `visitor`'s new run named `name` goes: the folder of that name, unless another visitor's run has it;
        then that name with the visitor's tag, so a name another holds starts a run as a free one does (saying it
        exists would tell what others named their runs). The visitor's own run of that name is said to exist."""
        checked = check_run_name(name)
        folder, tagged = self.runs_dir / checked, self.runs_dir / f"{checked}{PRIVATE_MARK}{_tag(visitor)}"
        if tagged.exists() or (folder.exists() and not visitor.owns_folder(folder)):
            return tagged
        return folder

    def runs_of(self, visitor: Visitor) -> list[RunSummary]:
        """`visitor`'s runs, newest first."""
        return list_runs(self.runs_dir, include=visitor.owns_folder)

    def suggest_run_name(self, visitor: Visitor) -> str:
        """A fresh run name for `visitor`: my-lora-1, -2, ... for the one user of their own app; where visitors are
        strangers, numbered after a short tag of the visitor's own, so the number counts only their runs (counting
        every folder would tell how many runs others made) and never lands on a name another visitor holds."""
        if visitor.sees_everything:
            return suggest_run_name(self.runs_dir)
        return suggest_run_name(self.runs_dir, f"my-lora-{_tag(visitor)}")

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

    def demo(self, session: str, visitor: Visitor) -> Staging:
        """The folder for the demo's pictures, emptied: the one shown, if it is the demo's; else a new one that
        remembers the visitor's own folder shown now, so the demo never mixes with nor throws away their pictures."""
        shown = self.staged(session, visitor)
        if shown is not None and shown.is_demo:
            shown.clear()
            return shown
        demo = self.staging("", visitor)
        demo.mark_demo(shown.session_id if shown is not None else "")
        return demo

    def own(self, session: str, visitor: Visitor) -> Staging | None:
        """The visitor's own pictures behind the folder shown: that folder itself, or the one the demo set aside
        (None if there is none, or it is gone)."""
        shown = self.staged(session, visitor)
        if shown is None or not shown.is_demo:
            return shown
        return self.staged(shown.own_session, visitor)

    def check_room_for_a_run(self, visitor: Visitor) -> None:
        """Refuses one more run of a visitor who has as many queued or training as this server allows, and any run
        when the disk is too full for its checkpoints."""
        waiting = [job for job in self.engine.jobs.jobs() if not job.done.is_set()]
        # All the ids the visitor holds: a signed-in visitor's account and the anonymous id their browser keeps.
        check_runs_waiting(sum(visitor.owns(job.owner) for job in waiting), self.limits)
        check_queue(len(waiting), self.limits)
        check_free_disk(self.runs_dir, self.limits)


def _tag(visitor: Visitor) -> str:
    """A short tag of the visitor's own, told from their owner id (itself a hash where they are anonymous)."""
    return hashlib.sha256(visitor.owner.encode()).hexdigest()[:6]
