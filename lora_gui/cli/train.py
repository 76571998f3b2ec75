"""`train`: a LoRA, from every TrainConfig setting as a flag (the help texts the app shows) on top of a preset or a
settings file; the pictures without a caption captioned first (`--caption-missing`), the settings suggested for
the pictures and this GPU (`--auto`). It also runs under `accelerate launch -m lora_gui train ...`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from tqdm import tqdm

from lora_gui import events
from lora_gui.cli.caption import caption_pictures
from lora_gui.cli.console import download_bar, stop_on_ctrl_c
from lora_gui.config import FAMILIES, TrainConfig, list_presets, load_preset
from lora_gui.downloads import DownloadProgress
from lora_gui.errors import LoraGuiError
from lora_gui.optimizers import settings_for_optimizer


def add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a LoRA",
        description="Train a LoRA. Flags override the preset or settings file; unset flags keep their values.",
    )
    train.add_argument("--output", required=True, help="run folder to create (or to resume with --resume)")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"start from a preset: {', '.join(list_presets())}")
    source.add_argument("--config", help="start from a settings file (a run's config.json works)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    train.add_argument(
        "--caption-missing",
        metavar="CAPTIONER",
        default=None,
        help="first caption the pictures in --data that have no caption, with this captioner (see `caption`); "
        "the captions are written beside the pictures",
    )
    train.add_argument(
        "--auto",
        action="store_true",
        help="suggest settings from the pictures in --data (their sizes and captions), what they show (--subject) "
        "and this computer's GPU, each with its reason; the flags given here win over them",
    )
    train.add_argument(
        "--subject",
        default="person",
        choices=("person", "object", "style"),
        help="with --auto: what the pictures are of (default person)",
    )
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %: "~30% speed" stays
        if isinstance(default, bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            train.add_argument(flag, nargs="*", default=None, help=help_text)
        else:
            train.add_argument(
                flag, type=type(default), default=None, help=help_text, choices=field.metadata.get("choices")
            )
    train.set_defaults(run=_train)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.preset:
        config = load_preset(args.preset)
    elif args.config:
        config = TrainConfig.load(args.config)
    elif args.resume and (Path(args.output) / "config.json").is_file():
        config = TrainConfig.load(Path(args.output) / "config.json")
    else:
        config = TrainConfig()
    overrides = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainConfig)
        if getattr(args, field.name) is not None
    }
    if "optimizer" in overrides:
        # `--optimizer prodigy` alone means Prodigy's learning rate (and schedule-free AdamW's steady schedule),
        # as picking it in the Train tab does; the flags given beside it are kept.
        base = config.to_dict() | overrides
        fitted = settings_for_optimizer(
            overrides["optimizer"],
            base["learning_rate"],
            base["text_encoder_learning_rate"],
            base["lr_scheduler"],
            base["lr_warmup_steps"],
        )
        overrides = {name: value for name, value in fitted.items() if name not in overrides} | overrides
    return config.replace(**overrides)


def _train(args: argparse.Namespace) -> int:
    from lora_gui.training import train

    config = _config_from_args(args)
    if args.caption_missing and not _caption_missing(config, args.caption_missing):
        return 0
    if args.auto:
        config = _suggested(config, args)
    with stop_on_ctrl_c("Stopping after this step") as stop:
        train(config, Path(args.output), resume=args.resume, on_event=_Terminal(), should_stop=stop.is_set)
    return 0


class _Terminal:
    """A run's events on the terminal: its base model's download, then a bar of its steps, its messages and
    samples (above the bar while there is one), and how it ended."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.download = download_bar()

    def __call__(self, event: events.Event) -> None:
        if event.kind == events.DOWNLOAD:
            self.download(DownloadProgress(**event.data))
        elif event.kind == events.MESSAGE:
            tqdm.write(event.data["text"]) if self.bar else print(event.data["text"], file=sys.stderr)
        elif event.kind == events.STARTED:
            self._started(event)
        elif event.kind == events.STEP and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.data['loss']:.4f}", img_s=f"{event.data['images_per_second']:.2f}")
        elif event.kind == events.SAMPLES:
            (tqdm.write if self.bar else print)(f"Samples: {', '.join(event.data['paths'])}")
        elif event.kind in events.ENDINGS:
            self._ended(event)

    def _started(self, event: events.Event) -> None:
        for skipped in event.data["skipped"]:
            print(f"Skipped {skipped}", file=sys.stderr)
        print(
            f"Training {event.data['family']} LoRA on {event.data['images']} images, {event.data['device']}, "
            f"precision {event.data['precision']}",
            file=sys.stderr,
        )
        if event.data.get("validation"):
            print(event.data["validation"], file=sys.stderr)
        self.bar = tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True)

    def _ended(self, event: events.Event) -> None:
        if self.bar is not None:
            self.bar.close()
        if event.kind == events.FINISHED:
            print(f"Done. LoRA: {event.data['lora']}", file=sys.stderr)
            if event.data.get("message"):
                print(event.data["message"], file=sys.stderr)
        elif event.kind == events.STOPPED:
            print(
                f"Stopped at step {event.step}. LoRA so far: {event.data['lora']}. Continue with --resume.",
                file=sys.stderr,
            )


def _suggested(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """`train --auto`: the suggested settings for the pictures of --data on this GPU, with their reasons printed;
    the settings given as flags stay as given."""
    from lora_gui.base_models import family_from_files
    from lora_gui.data import scan_folder
    from lora_gui.suggest import Card, Pictures, suggest

    folder = Path(config.data).expanduser()
    if not folder.is_dir():
        raise LoraGuiError(
            f"--auto reads the pictures' sizes and captions in a folder: --data must be one ({config.data!r})"
        )
    family = config.family if config.family != "auto" else family_from_files(config.base_model)
    if family is None:
        raise LoraGuiError(
            f"--auto needs the kind of model without downloading it: give --family ({', '.join(FAMILIES[1:])})"
        )
    given = {field.name for field in dataclasses.fields(TrainConfig) if getattr(args, field.name) is not None}
    pictures = Pictures.of(scan_folder(folder, config.default_caption).examples)
    suggestion = suggest(pictures, args.subject, family, Card.here(), config, keep=given)
    for note in suggestion.notes:
        print(note, file=sys.stderr)
    for change in suggestion.changes:
        print(f"  --{change.setting.replace('_', '-')} {change.value_text}: {change.reason}", file=sys.stderr)
    if suggestion.kept:
        flags = ", ".join("--" + name.replace("_", "-") for name in suggestion.kept)
        print(f"  Kept as given: {flags}", file=sys.stderr)
    return suggestion.config


def _caption_missing(config: TrainConfig, captioner: str) -> bool:
    """`train --caption-missing`: caption the pictures of --data that have none; whether to go on and train."""
    folder = Path(config.data).expanduser()
    if not folder.is_dir():
        raise LoraGuiError(
            f"--caption-missing writes captions beside the pictures, so --data must be a folder (got {config.data!r})"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would caption the same pictures at once
        raise LoraGuiError(
            "--caption-missing can't run under accelerate launch: caption first with `python -m lora_gui caption`"
        )
    # No trigger word in the files: training puts it in front of every caption itself.
    result = caption_pictures(folder, captioner)
    if result is not None and result.captioned:
        print(f"The captions are written beside the pictures in {folder} (same-name .txt files)", file=sys.stderr)
    if result is not None and result.stopped:
        print("Stopped before training: run the same command again to caption the rest and train", file=sys.stderr)
        return False
    return True
