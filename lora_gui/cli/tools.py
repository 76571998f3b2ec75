"""The other commands: `ui` (the app in the browser), `tiny-model` (a tiny random-weight model), `presets`, `bench`
(our training step against the reference script's) and `doctor` (what in a folder of pictures would make a LoRA
worse)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_gui.config import FAMILIES, MIXED_PRECISIONS, TrainConfig, list_presets
from lora_gui.errors import LoraGuiError
from lora_gui.families import REGISTRY, bench_models


def add_ui(commands: argparse._SubParsersAction) -> None:
    ui = commands.add_parser("ui", help="start the app in the browser (same as python app.py)")
    ui.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for everyone)")
    ui.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    ui.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    ui.add_argument("--auth", default="", help="ask for this user name and password: USER:PASS")
    ui.add_argument("--runs-dir", default="", help="where runs are saved (default ./runs, or /data/runs on a Space)")
    ui.set_defaults(run=_ui)


def _ui(args: argparse.Namespace) -> int:
    from lora_gui.ui.app import launch

    launch(host=args.host, port=args.port, share=args.share, auth=args.auth, runs_dir=args.runs_dir)
    return 0


def add_tiny_model(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight model for tests and the offline demo")
    tiny.add_argument("folder")
    # Without --family, the registry's first family: the one the offline demo's model and most tests are.
    tiny.add_argument("--family", default=next(iter(REGISTRY)), choices=list(REGISTRY))
    tiny.set_defaults(run=_tiny_model)


def _tiny_model(args: argparse.Namespace) -> int:
    from lora_gui.tiny import write_tiny_model

    write_tiny_model(args.folder, args.family)
    print(f"Wrote a tiny {args.family} model to {args.folder}", file=sys.stderr)
    return 0


def add_presets(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("presets", help="list the presets").set_defaults(run=_presets)


def _presets(args: argparse.Namespace) -> int:
    for name, description in list_presets().items():
        print(f"{name:24} {description}")
    return 0


def add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="time our training step against the reference script's",
        description="Runs the reference script's per-step work and our training loop in this process on the same "
        "model, images and settings, and prints a table. sd15/sdxl/flux are the real architectures with random "
        "weights; flux-shallow is Flux.1 at full width with 1/19 of its depth (1 double, 2 single blocks, 1 T5 "
        "layer), which a CPU holds.",
    )
    bench.add_argument("--model", default="tiny", choices=list(bench_models()))
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
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
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

    from lora_gui.bench import format_table, run_bench, save_json

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


def add_doctor(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="find what in a folder of pictures would make a LoRA worse, and how to fix it",
        description="Looks for near-duplicates, small, blurry and very long pictures, and captions that are empty, "
        "all the same, lack the trigger word or run past what the text encoder reads, and edit pairs (--control-data) "
        "missing a partner, showing no change or of two shapes; one finding a line.",
    )
    doctor.add_argument("data", metavar="DATA", help="the folder of pictures (with same-name .txt captions)")
    doctor.add_argument(
        "--resolution", type=int, default=None, help="training resolution (default: the family's usual, else 512)"
    )
    doctor.add_argument("--family", default=None, choices=FAMILIES[1:], help="the base model's family")
    doctor.add_argument("--trigger", default="", help=TrainConfig.help("trigger_word"))
    doctor.add_argument("--default-caption", default="", help=TrainConfig.help("default_caption"))
    doctor.add_argument("--control-data", default="", help=TrainConfig.help("control_data"))
    doctor.set_defaults(run=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from lora_gui.doctor import diagnose
    from lora_gui.families import get_family

    if args.resolution is None:
        args.resolution = get_family(args.family).default_resolution if args.family else TrainConfig().resolution
    findings = diagnose(
        Path(args.data), args.resolution, args.family, args.trigger, args.default_caption, args.control_data
    )
    for finding in findings:
        files = f"{', '.join(finding.files[:5])}{' ...' if len(finding.files) > 5 else ''}: " if finding.files else ""
        print(f"{finding.severity}: {files}{finding.message}")
    if not findings:
        print("No problems found.")
    return 0
