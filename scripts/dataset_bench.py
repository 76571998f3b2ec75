"""How long the Dataset tab and Start take on a large upload: 500 pictures of 4000x3000.

    PYTHONPATH=. python scripts/dataset_bench.py [--count 500] [--repeat 20] [--starts 5] [--workdir DIR]

Prints one table row per step, through the app's own handlers (no browser, no training):

- adding the pictures: the Dataset tab's folder import (copies, thumbnails, then the checks it shows);
- a caption edit: `Staging.set_caption` and the recount the tab shows after it (`checks_html`), as the
  caption box's handler does; the median of --repeat edits;
- Start: the Train tab's `start` (its checks, the run's pictures written, the run queued; the queue
  never trains here); the median of --starts, each a new run;
- the checks in a fresh process: the same recount with nothing remembered, as after a restart;
- the run's "Checking images": `train()` up to loading the model (a missing one, so it stops there).

The pictures are made once in --workdir and reused: a few distinct 4000x3000 JPEGs (smooth colour
noise, shapes and grain, about a photo's size), each copied to many names with a JPEG comment segment
of its own length put after the start marker. Every file so has other bytes and another size, as
photos do, so the duplicates check finds no copies, while decoding costs what a photo costs. The
script uses only what the app had before the Dataset tab's checks were made header-only, so the same
file times an older checkout: `PYTHONPATH=/path/to/old python scripts/dataset_bench.py`.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = (4000, 3000)
DISTINCT = 5


def make_pictures(folder: Path, count: int) -> Path:
    """`count` JPEGs with captions in `folder`, made once (a folder that has them all is reused)."""
    if len(list(folder.glob("*.jpg"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    bases = [_base_jpeg(seed) for seed in range(DISTINCT)]
    for index in range(count):
        base = bases[index % DISTINCT]
        comment = f"copy {index} ".encode().ljust(index + 8, b".")
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        (folder / f"photo-{index:04d}.jpg").write_bytes(base[:2] + segment + base[2:])
        (folder / f"photo-{index:04d}.txt").write_text(f"a photo of sks, number {index}\n", encoding="utf-8")
    return folder


def _base_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(SIZE, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(coarse)
    for _ in range(12):
        x, y = rng.integers(0, SIZE[0]), rng.integers(0, SIZE[1])
        w, h = rng.integers(200, 1200, size=2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=fill)
    grain = rng.normal(0, 6, (SIZE[1], SIZE[0], 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def fresh_check(runs_dir: str, session: str) -> None:
    """In a new process: the Dataset tab's recount, with nothing remembered yet."""
    from types import SimpleNamespace

    from lora_gui.ui.dataset import checks_html

    seconds, _ = timed(lambda: checks_html(SimpleNamespace(runs_dir=Path(runs_dir)), session, 512, ""))
    print(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20, help="caption edits to time (the median is shown)")
    parser.add_argument("--starts", type=int, default=5, help="Starts to time, each a new run (the median is shown)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dataset-bench"))
    parser.add_argument("--fresh-check", nargs=2, metavar=("RUNS_DIR", "SESSION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fresh_check:
        fresh_check(*args.fresh_check)
        return

    from lora_gui.config import TrainConfig
    from lora_gui.errors import LoraGuiError
    from lora_gui.jobs import JobManager
    from lora_gui.staging import Staging
    from lora_gui.training import train
    from lora_gui.ui import config_form, train_tab
    from lora_gui.ui.app import build_app
    from lora_gui.ui.dataset import add_folder, checks_html
    from lora_gui.ui.model_choices import TINY_CHOICE

    class QueueOnly(JobManager):
        def _work(self) -> None:
            """No worker: runs are queued, never trained."""

    workdir = Path(args.workdir)
    pictures = make_pictures(workdir / f"pictures-{args.count}", args.count)
    sizes = [path.stat().st_size for path in pictures.glob("*.jpg")]
    print(f"{args.count} pictures of {SIZE[0]}x{SIZE[1]}: {sum(sizes) / 1e6:.0f} MB, {len(set(sizes))} distinct sizes")
    runs_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir))
    _, ctx = build_app(runs_dir, QueueOnly())
    ctx.models.resolve(TINY_CHOICE)  # the tiny model is written on first use: not part of any row
    rows = []
    try:
        checks = dict(resolution=512, default_caption="", dataset_version=0)
        added, result = timed(lambda: add_folder(ctx, folder=str(pictures), session="", **checks))
        session = result["session"]
        assert f"Added {args.count} pictures" in result["dataset_notice"], result["dataset_notice"]
        rows.append((f"adding the {args.count} pictures (folder import, thumbnails, checks)", added, 1))

        edits = []
        for index in range(args.repeat):
            relpath = f"photo-{index % args.count:04d}.jpg"

            def edit(relpath=relpath, index=index) -> str:
                Staging.for_session(ctx.runs_dir, session).set_caption(relpath, f"a photo of sks, edit {index}")
                return checks_html(ctx, session, 512, "")

            seconds, report = timed(edit)
            assert f"{args.count} pictures ready to train" in report, report
            edits.append(seconds)
        rows.append(("a caption edit, with the recount the Dataset tab shows", statistics.median(edits), len(edits)))

        settings = {**config_form.widget_values(TrainConfig()), "max_steps": 10}
        starts, jobs = [], []
        for index in range(args.starts):
            seconds, result = timed(
                lambda index=index: train_tab.start(
                    ctx, session=session, run_name=f"bench-{index}", base_model=TINY_CHOICE, **settings
                )
            )
            assert result.get("train_job"), result["train_notice"]
            starts.append(seconds)
            jobs.append(ctx.engine.jobs.get(result["train_job"]))
        rows.append(("Start (its checks, the run's pictures, queueing)", statistics.median(starts), len(starts)))

        command = [sys.executable, __file__, "--fresh-check", str(runs_dir), session]
        fresh = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ)
        rows.append(("the recount in a fresh process (nothing remembered)", float(fresh.stdout.split()[-1]), 1))

        job = jobs[0]
        config = job.config.replace(base_model=str(workdir / "no-such-model"))
        begun = time.perf_counter()
        try:
            train(config, job.run.path)
        except LoraGuiError as error:
            assert "not found" in str(error), error
        rows.append(("the run's 'Checking images' (train() until the model loads)", time.perf_counter() - begun, 1))
    finally:
        ctx.engine.jobs.close(timeout=1)
        shutil.rmtree(runs_dir, ignore_errors=True)

    import PIL

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Pillow {PIL.__version__}\n"
    )
    print("| step | seconds | times run |")
    print("|---|---|---|")
    for what, seconds, times in rows:
        print(f"| {what} | {seconds:.3f} | {times} |")


if __name__ == "__main__":
    main()
