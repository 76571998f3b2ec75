"""What several commands show on the terminal alike: a download's progress bar, and Ctrl+C stopping work cleanly
at its next step."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from tqdm import tqdm

from lora_gui.downloads import DownloadProgress


def download_bar() -> Callable[[DownloadProgress], None]:
    """A progress bar for a download, drawn from its first report and closed at its last (every byte, every file)."""
    bar: tqdm | None = None

    def show(progress: DownloadProgress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=progress.total_bytes, unit="B", unit_scale=True, desc=f"Downloading {progress.repo}")
        bar.update(progress.done_bytes - bar.n)
        bar.set_postfix_str(f"{progress.files_done} of {progress.files_total} files")
        if progress.done_bytes == progress.total_bytes and progress.files_done == progress.files_total:
            bar.close()

    return show


@contextlib.contextmanager
def stop_on_ctrl_c(saying: str) -> Iterator[threading.Event]:
    """An event Ctrl+C sets (a second one quits at once), for work that stops cleanly at its next step. SIGTERM
    (`docker stop`, `kill`) is the same as Ctrl+C."""
    stop = threading.Event()

    def on_interrupt(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(f"\n{saying} (press Ctrl+C again to quit at once)...", file=sys.stderr)
        stop.set()

    previous = {number: signal.signal(number, on_interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
