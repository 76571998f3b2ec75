"""Command line: `python -m lora_gui ui|caption|train|generate|export|resize|merge|push|tiny-model|presets|bench|
doctor`.

`train` takes every TrainConfig setting as a flag (from the same help texts the app shows), on top
of a preset or a settings file. It also runs under `accelerate launch -m lora_gui train ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_gui.config import FAMILIES, MIXED_PRECISIONS, TrainConfig, list_presets, load_preset
from lora_gui.errors import LoraGuiError
from lora_gui.lora_files import LORA_LAYOUTS
from lora_gui.optimizers import settings_for_optimizer
from lora_gui.quantization import GENERATE_CHOICES

if TYPE_CHECKING:
    from lora_gui.base_models import DownloadProgress
    from lora_gui.captioning.folder import CaptionPass
    from lora_gui.lora_files.reshape import Reshaped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_gui", description="Train and use LoRAs for Stable Diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)
    _ui_parser(commands)
    _caption_parser(commands)
    _train_parser(commands)
    _generate_parser(commands)
    _export_parser(commands)
    _reshape_parsers(commands)
    _push_parser(commands)
    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight model for tests and the offline demo")
    tiny.add_argument("folder")
    tiny.add_argument("--family", default="sd15", choices=FAMILIES[1:])
    commands.add_parser("presets", help="list the presets")
    _bench_parser(commands)
    _doctor_parser(commands)
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except LoraGuiError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1


def _quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) would bury our own messages."""
    import warnings

    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[console])
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "diffusers", "accelerate", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# ---- ui ----------------------------------------------------------------------------------------
def _ui_parser(commands: argparse._SubParsersAction) -> None:
    ui = commands.add_parser("ui", help="start the app in the browser (same as python app.py)")
    ui.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for everyone)")
    ui.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    ui.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    ui.add_argument("--auth", default="", help="ask for this user name and password: USER:PASS")
    ui.add_argument("--runs-dir", default="", help="where runs are saved (default ./runs, or /data/runs on a Space)")


def _ui(args: argparse.Namespace) -> int:
    from lora_gui.ui.app import launch

    launch(host=args.host, port=args.port, share=args.share, auth=args.auth, runs_dir=args.runs_dir)
    return 0


# ---- train -------------------------------------------------------------------------------------
def _train_parser(commands: argparse._SubParsersAction) -> None:
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
        help_text = field.metadata["help"]
        if isinstance(default, bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            train.add_argument(flag, nargs="*", default=None, help=help_text)
        else:
            train.add_argument(
                flag, type=type(default), default=None, help=help_text, choices=field.metadata.get("choices")
            )


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
    from tqdm import tqdm

    from lora_gui import events
    from lora_gui.training import train

    config = _config_from_args(args)
    if args.caption_missing and not _caption_missing(config, args.caption_missing):
        return 0
    if args.auto:
        config = _suggested(config, args)
    stop = threading.Event()

    def on_interrupt(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nStopping after this step (press Ctrl+C again to quit at once)...", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)  # `docker stop`, `kill`: the same as Ctrl+C
    bar: tqdm | None = None
    download: tqdm | None = None

    def on_event(event: events.Event) -> None:
        nonlocal bar, download
        if event.kind == events.DOWNLOAD:
            data = event.data
            if download is None:
                download = tqdm(
                    total=data["total_bytes"], unit="B", unit_scale=True, desc=f"Downloading {data['repo']}"
                )
            download.update(data["done_bytes"] - download.n)
            download.set_postfix_str(f"{data['files_done']} of {data['files_total']} files")
            if data["done_bytes"] == data["total_bytes"]:
                download.close()
        elif event.kind == events.MESSAGE:
            tqdm.write(event.data["text"]) if bar else print(event.data["text"], file=sys.stderr)
        elif event.kind == events.STARTED:
            for skipped in event.data["skipped"]:
                print(f"Skipped {skipped}", file=sys.stderr)
            print(
                f"Training {event.data['family']} LoRA on {event.data['images']} images, {event.data['device']}, "
                f"precision {event.data['precision']}",
                file=sys.stderr,
            )
            if event.data.get("validation"):
                print(event.data["validation"], file=sys.stderr)
            bar = tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True)
        elif event.kind == events.STEP and bar is not None:
            bar.update(event.step - bar.n)
            bar.set_postfix(loss=f"{event.data['loss']:.4f}", img_s=f"{event.data['images_per_second']:.2f}")
        elif event.kind == events.SAMPLES:
            (tqdm.write if bar else print)(f"Samples: {', '.join(event.data['paths'])}")
        elif event.kind in events.ENDINGS:
            if bar is not None:
                bar.close()
            if event.kind == events.FINISHED:
                print(f"Done. LoRA: {event.data['lora']}", file=sys.stderr)
                if event.data.get("message"):
                    print(event.data["message"], file=sys.stderr)
            elif event.kind == events.STOPPED:
                print(
                    f"Stopped at step {event.step}. LoRA so far: {event.data['lora']}. Continue with --resume.",
                    file=sys.stderr,
                )

    train(config, Path(args.output), resume=args.resume, on_event=on_event, should_stop=stop.is_set)
    return 0


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


# ---- caption -----------------------------------------------------------------------------------
def _caption_parser(commands: argparse._SubParsersAction) -> None:
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


def _caption(args: argparse.Namespace) -> int:
    _caption_pictures(
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
    result = _caption_pictures(folder, captioner)
    if result is not None and result.captioned:
        print(f"The captions are written beside the pictures in {folder} (same-name .txt files)", file=sys.stderr)
    if result is not None and result.stopped:
        print("Stopped before training: run the same command again to caption the rest and train", file=sys.stderr)
        return False
    return True


def _caption_pictures(folder: Path, name: str, **settings: Any) -> CaptionPass | None:
    """Caption the pictures of `folder` with the captioner `name`, with progress bars (its download, then the
    pictures), the pictures skipped, and a summary line; Ctrl+C stops after the batch. None: nothing to caption."""
    from tqdm import tqdm

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
    captioner = load_captioner(name, device="cuda" if has_cuda() else "cpu", on_progress=_download_bar(), **options)
    pictures = f"{total} picture{'' if total == 1 else 's'}"
    print(f"Captioning {pictures} in {folder} with {name} on {captioner.runs_on}", file=sys.stderr)
    bar = tqdm(total=total, unit="picture", dynamic_ncols=True)
    try:
        with _stop_on_ctrl_c("Stopping after these pictures") as stop:
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


def _download_bar() -> Callable[[DownloadProgress], None]:
    """A progress bar for a download, drawn from its first report."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def show(progress: DownloadProgress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=progress.total_bytes, unit="B", unit_scale=True, desc=f"Downloading {progress.repo}")
        bar.update(progress.done_bytes - bar.n)
        bar.set_postfix_str(f"{progress.files_done} of {progress.files_total} files")
        if progress.files_done == progress.files_total:
            bar.close()

    return show


@contextlib.contextmanager
def _stop_on_ctrl_c(saying: str) -> Iterator[threading.Event]:
    """An event Ctrl+C sets (a second one quits at once), for work that stops cleanly at its next step."""
    stop = threading.Event()

    def on_interrupt(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(f"\n{saying} (press Ctrl+C again to quit at once)...", file=sys.stderr)
        stop.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- generate ----------------------------------------------------------------------------------
def _generate_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="generate an image with a LoRA")
    generate.add_argument("--base-model", required=True, help=TrainConfig.help("base_model"))
    generate.add_argument("--lora", action="append", default=[], help="LoRA file or run folder (repeatable)")
    generate.add_argument("--scale", type=float, action="append", default=[], help="strength of each --lora (1.0)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--output", required=True, help="PNG file to write")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the model's usual, 25 for SD)"
    )
    generate.add_argument(
        "--guidance", type=float, default=None, help="guidance (default: the model's usual, 7 for SD)"
    )
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--family", default="auto")
    generate.add_argument(
        "--precision", default="auto", choices=MIXED_PRECISIONS, help=TrainConfig.help("mixed_precision")
    )
    generate.add_argument(
        "--quantize",
        default="auto",
        choices=GENERATE_CHOICES,
        help="store the base model's denoiser in fewer bits: auto (only as much as this GPU needs), none, int8 "
        "(half the memory, any device) or nf4 (a quarter, NVIDIA GPUs, not from a single-file checkpoint)",
    )
    generate.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin/.pt/.ckpt LoRAs (unsafe)")


def _generate(args: argparse.Namespace) -> int:
    from lora_gui.atomic import atomic_path
    from lora_gui.infer import Generator

    if len(args.scale) > len(args.lora):
        raise LoraGuiError("more --scale values than --lora files")
    scales = args.scale + [1.0] * (len(args.lora) - len(args.scale))
    generator = Generator.load(args.base_model, args.family, args.precision, args.quantize)
    generator.set_loras(list(zip(args.lora, scales, strict=True)), allow_pickle=args.allow_pickle)
    image = generator(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance, args.width, args.height)
    with atomic_path(Path(args.output)) as tmp:
        image.save(tmp, format="PNG")
    print(f"Wrote {args.output}", file=sys.stderr)
    return 0


# ---- export and push ---------------------------------------------------------------------------
def _export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a run's LoRA again, in kohya's layout (A1111, Forge, ComfyUI) or diffusers'",
        description="Write a run's LoRA file again from its run folder, with the same metadata training wrote.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    export.add_argument("--format", default="kohya", choices=LORA_LAYOUTS, help="which layout (default: kohya)")
    export.add_argument(
        "--output", default=None, help="file to write (a folder for --format both); default: into the run folder"
    )


def _export(args: argparse.Namespace) -> int:
    from lora_gui.lora_files.export import export_run

    for path in export_run(args.run_dir, args.format, args.output):
        print(f"Wrote {path}", file=sys.stderr)
    return 0


# ---- resize and merge --------------------------------------------------------------------------
_LORA_SOURCE = "a run folder, a run's name in --runs-dir, or a LoRA file (kohya's or diffusers' layout)"
_OUTPUT = "the kohya-layout file to write; its diffusers-layout copy goes beside it as NAME.diffusers.safetensors"


def _reshape_parsers(commands: argparse._SubParsersAction) -> None:
    resize = commands.add_parser(
        "resize",
        help="write a LoRA again at a lower rank (a smaller file), keeping the most of it an SVD can",
        description="Cut every layer of a LoRA to at most --rank by SVD, and say how much of it each kept.",
    )
    resize.add_argument("source", metavar="RUN_OR_FILE", help=_LORA_SOURCE)
    resize.add_argument("--rank", type=int, required=True, help="the new rank")
    merge = commands.add_parser(
        "merge",
        help="merge several LoRAs into one, each at its own strength",
        description="One LoRA that does what these do together: their layers stacked (the ranks add), or with "
        "--rank their sum cut to that rank by SVD.",
    )
    merge.add_argument("sources", metavar="RUN_OR_FILE", nargs="+", help=_LORA_SOURCE)
    merge.add_argument("--weights", type=float, nargs="+", default=None, help="each one's strength (default: 1 each)")
    merge.add_argument("--rank", type=int, default=None, help="cut the merged LoRA to this rank (default: exact)")
    for command in (resize, merge):
        command.add_argument("--output", required=True, help=_OUTPUT)
        command.add_argument("--runs-dir", default="", help="where runs are looked up by name (default ./runs)")


def _resize(args: argparse.Namespace) -> int:
    from lora_gui.lora_files.reshape import locate, resize_lora

    return _report(resize_lora(locate(args.source, args.runs_dir), args.rank, args.output))


def _merge(args: argparse.Namespace) -> int:
    from lora_gui.lora_files.reshape import locate, merge_loras

    weights = args.weights or [1.0] * len(args.sources)
    if len(weights) != len(args.sources):
        raise LoraGuiError(f"--weights gives {len(weights)} strengths for {len(args.sources)} LoRAs; give one each")
    sources = [(locate(source, args.runs_dir), weight) for source, weight in zip(args.sources, weights, strict=True)]
    return _report(merge_loras(sources, args.output, args.rank))


def _report(result: Reshaped) -> int:
    print(f"{result.note[:1].upper()}{result.note[1:]}.", file=sys.stderr)
    for path in result.files:
        print(f"Wrote {path}", file=sys.stderr)
    return 0


def _push_parser(commands: argparse._SubParsersAction) -> None:
    push = commands.add_parser(
        "push",
        help="upload a run's LoRA files, model card and previews to the Hugging Face Hub",
        description="Upload a run to a Hub model repo (created if needed). The token comes from --token, "
        "else the HF_TOKEN environment variable, else your `hf auth login`; it is never printed or saved.",
    )
    push.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    push.add_argument("--repo", required=True, help="NAME or OWNER/NAME of the Hub repo")
    push.add_argument("--private", action="store_true", help="make a new repo private")
    push.add_argument("--token", default=None, help="a write token (HF_TOKEN keeps it out of your shell history)")


def _push(args: argparse.Namespace) -> int:
    from lora_gui.hub import push_to_hub

    url = push_to_hub(args.run_dir, args.repo, args.token or os.environ.get("HF_TOKEN"), args.private)
    print(f"Uploaded to {url}", file=sys.stderr)
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from lora_gui.tiny import write_tiny_model

    write_tiny_model(args.folder, args.family)
    print(f"Wrote a tiny {args.family} model to {args.folder}", file=sys.stderr)
    return 0


def _presets(args: argparse.Namespace) -> int:
    for name, description in list_presets().items():
        print(f"{name:24} {description}")
    return 0


def _bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="time our training step against the reference script's",
        description="Runs the reference script's per-step work and our training loop in this process on the same "
        "model, images and settings, and prints a table. sd15/sdxl/flux are the real architectures with random "
        "weights; flux-shallow is Flux.1 at full width with 1/19 of its depth (1 double, 2 single blocks, 1 T5 "
        "layer), which a CPU holds.",
    )
    bench.add_argument("--model", default="tiny", choices=("tiny", "sd15", "sdxl", "flux-tiny", "flux-shallow", "flux"))
    bench.add_argument("--steps", type=int, default=20, help="timed steps of each loop")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    bench.add_argument("--batch-size", type=int, default=2)
    bench.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="default: 128 tiny and flux-tiny, 512 sd15 and flux-shallow, 1024 sdxl and flux",
    )
    bench.add_argument("--rank", type=int, default=16)
    bench.add_argument("--precision", default="auto", choices=MIXED_PRECISIONS)
    bench.add_argument("--images", type=int, default=8)
    bench.add_argument("--workdir", default=None, help="keeps the generated model between runs")
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.add_argument(
        "--repeat", type=int, default=1, help="run the two loops in turn this many times; report the median pair"
    )
    bench.add_argument("--preset", default="", help="train ours with this preset's settings (e.g. sdxl-low-vram)")
    bench.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="a setting for ours, e.g. channels_last=true",
    )


def _bench(args: argparse.Namespace) -> int:
    from lora_gui.bench import format_table, run_bench, save_json

    if any("=" not in setting for setting in args.ours):
        raise LoraGuiError("--ours takes SETTING=VALUE, for example --ours channels_last=true")
    for flag, value, least in (
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--batch-size", args.batch_size, 1),
        ("--images", args.images, 1),
        ("--repeat", args.repeat, 1),
    ):
        if value < least:
            raise LoraGuiError(f"{flag} must be {least} or more (got {value})")

    reference, ours, info = run_bench(
        args.model,
        args.steps,
        args.warmup,
        args.batch_size,
        args.resolution,
        args.rank,
        args.precision,
        args.images,
        Path(args.workdir) if args.workdir else None,
        args.preset,
        dict(setting.split("=", 1) for setting in args.ours),
        args.repeat,
    )
    if args.json:
        save_json(Path(args.json), reference, ours, info)
    print(format_table(reference, ours, info))
    return 0


# ---- doctor ------------------------------------------------------------------------------------
def _doctor_parser(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="find what in a folder of pictures would make a LoRA worse, and how to fix it",
        description="Looks for near-duplicates, small, blurry and very long pictures, and captions that are empty, "
        "all the same, lack the trigger word or run past what the text encoder reads; one finding a line.",
    )
    doctor.add_argument("data", metavar="DATA", help="the folder of pictures (with same-name .txt captions)")
    doctor.add_argument(
        "--resolution", type=int, default=None, help="training resolution (default: the family's usual, else 512)"
    )
    doctor.add_argument("--family", default=None, choices=FAMILIES[1:], help="the base model's family")
    doctor.add_argument("--trigger", default="", help=TrainConfig.help("trigger_word"))
    doctor.add_argument("--default-caption", default="", help=TrainConfig.help("default_caption"))


def _doctor(args: argparse.Namespace) -> int:
    from lora_gui.doctor import diagnose
    from lora_gui.families import get_family

    if args.resolution is None:
        args.resolution = get_family(args.family).default_resolution if args.family else TrainConfig().resolution
    findings = diagnose(Path(args.data), args.resolution, args.family, args.trigger, args.default_caption)
    for finding in findings:
        files = f"{', '.join(finding.files[:5])}{' ...' if len(finding.files) > 5 else ''}: " if finding.files else ""
        print(f"{finding.severity}: {files}{finding.message}")
    if not findings:
        print("No problems found.")
    return 0


COMMANDS = {
    "ui": _ui,
    "caption": _caption,
    "train": _train,
    "generate": _generate,
    "export": _export,
    "resize": _resize,
    "merge": _merge,
    "push": _push,
    "tiny-model": _tiny_model,
    "presets": _presets,
    "bench": _bench,
    "doctor": _doctor,
}

if __name__ == "__main__":
    sys.exit(main())
