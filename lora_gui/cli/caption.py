"""`caption`: a caption for each picture of a folder, written by a captioning model into a same-name .txt file beside
it; `train --caption-missing` captions the same way before training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from lora_gui.cli.console import download_bar, stop_on_ctrl_c

if TYPE_CHECKING:
    from lora_gui.captioning.folder import CaptionPass


def add_caption(commands: argparse._SubParsersAction) -> None:
    caption = commands.add_parser(
        "caption",
        help="write a caption for each picture of a folder, with a captioning model",
        description="Writes each picture's caption into a same-name .txt file beside it, which training reads. "
        "Without --overwrite, only pictures with no caption (or an empty one) are captioned. A captioner downloads "
        "the first time it is used.",
    )
    caption.add_argument("data", metavar="DATA", help="the folder of pictures (subfolders too)")
    caption.add_argument(
        "--captioner",
        required=True,
        metavar="NAME",
        help="which captioning model: florence2-base or florence2-large (sentences, for photos), wd-tagger or "
        "wd-tagger-large (booru tags, for anime and illustration)",
    )
    caption.add_argument("--overwrite", action="store_true", help="caption every picture again, replacing its caption")
    caption.add_argument("--prefix", default="", metavar="WORD", help="put this word (a trigger word) in front")
    caption.add_argument(
        "--source", default=None, metavar="FOLDER", help="load the captioner from this folder instead of the Hub"
    )
    caption.add_argument(
        "--threshold", type=float, default=None, help="WD taggers: how sure a tag must be, 0 to 1 (default 0.35)"
    )
    caption.add_argument(
        "--exclude", default=None, metavar="TAGS", help="WD taggers: tags to leave out, comma-separated"
    )
    caption.add_argument("--batch-size", type=int, default=4, help="pictures captioned at a time (default 4)")
    caption.set_defaults(run=_caption)


def _caption(args: argparse.Namespace) -> int:
    caption_pictures(
        Path(args.data).expanduser(),
        args.captioner,
        overwrite=args.overwrite,
        prefix=args.prefix,
        source=args.source,
        batch_size=args.batch_size,
        threshold=args.threshold,
        exclude=args.exclude,
    )
    return 0


def caption_pictures(folder: Path, name: str, **settings: Any) -> CaptionPass | None:
    """Caption the pictures of `folder` with the captioner `name`, with progress bars (its download, then the
    pictures), the pictures skipped, and a summary line; Ctrl+C stops after the batch. None: nothing to caption."""
    from lora_gui.captioning import load_captioner
    from lora_gui.captioning.folder import caption_folder, pictures_to_caption
    from lora_gui.devices import has_cuda

    overwrite, prefix = settings.pop("overwrite", False), settings.pop("prefix", "")
    batch_size = settings.pop("batch_size", 4)
    total = len(pictures_to_caption(folder, overwrite=overwrite))
    if not total:
        again = "" if overwrite else " (--overwrite captions them again)"
        print(f"No picture in {folder} needs a caption{again}", file=sys.stderr)
        return None
    options = {key: value for key, value in settings.items() if value is not None}  # flags left unset
    captioner = load_captioner(name, device="cuda" if has_cuda() else "cpu", on_progress=download_bar(), **options)
    pictures = f"{total} picture{'' if total == 1 else 's'}"
    print(f"Captioning {pictures} in {folder} with {name} on {captioner.runs_on}", file=sys.stderr)
    bar = tqdm(total=total, unit="picture", dynamic_ncols=True)
    try:
        with stop_on_ctrl_c("Stopping after these pictures") as stop:
            result = caption_folder(
                folder,
                captioner,
                overwrite=overwrite,
                prefix=prefix,
                batch_size=batch_size,
                on_caption=lambda relpath, caption: bar.update(1),
                should_stop=stop.is_set,
            )
    finally:
        bar.close()
        captioner.close()
    for skipped in result.skipped:
        print(f"Skipped {skipped}", file=sys.stderr)
    for relpath in result.kept:
        print(f"Kept {relpath}'s caption: it was edited while captioning ran", file=sys.stderr)
    print(result.summary(), file=sys.stderr)
    return result
