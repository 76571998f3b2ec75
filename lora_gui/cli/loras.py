"""Using LoRAs: `generate` (an image with LoRAs at their strengths), `export` (a run's LoRA in kohya's layout or
diffusers'), `resize` and `merge` (a lower rank, several LoRAs in one), `push` (a run to the Hugging Face Hub)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lora_gui.config import MIXED_PRECISIONS, TrainConfig
from lora_gui.errors import LoraGuiError
from lora_gui.lora_files import LORA_LAYOUTS
from lora_gui.quantization import GENERATE_CHOICES

if TYPE_CHECKING:
    from PIL import Image

    from lora_gui.lora_files.reshape import Reshaped


def add_generate(commands: argparse._SubParsersAction) -> None:
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
    generate.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PICTURE",
        help="a picture to edit as the prompt says, for an editing model (repeatable where the model takes several); "
        "the picture made takes its shape unless --width/--height say otherwise",
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
    generate.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    from lora_gui.atomic import atomic_path
    from lora_gui.infer import Generator

    if len(args.scale) > len(args.lora):
        raise LoraGuiError("more --scale values than --lora files")
    scales = args.scale + [1.0] * (len(args.lora) - len(args.scale))
    pictures = [_picture_to_edit(path) for path in args.image]  # a bad one is said before the model loads
    generator = Generator.load(args.base_model, args.family, args.precision, args.quantize)
    generator.set_loras(list(zip(args.lora, scales, strict=True)), allow_pickle=args.allow_pickle)
    image = generator(
        args.prompt,
        args.negative_prompt,
        args.seed,
        args.steps,
        args.guidance,
        args.width,
        args.height,
        images=pictures or None,
    )
    with atomic_path(Path(args.output)) as tmp:
        image.save(tmp, format="PNG")
    print(f"Wrote {args.output}", file=sys.stderr)
    return 0


def _picture_to_edit(path: str) -> Image.Image:
    from lora_gui.data import UnusableImage, open_image

    picture = Path(path).expanduser()
    if not picture.is_file():
        raise LoraGuiError(f"--image {path}: no such picture file")
    try:
        return open_image(picture)
    except (UnusableImage, OSError) as problem:
        raise LoraGuiError(f"--image {path} can't be used: {problem}") from None


def add_export(commands: argparse._SubParsersAction) -> None:
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
    export.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from lora_gui.lora_files.export import export_run

    for path in export_run(args.run_dir, args.format, args.output):
        print(f"Wrote {path}", file=sys.stderr)
    return 0


_LORA_SOURCE = "a run folder, a run's name in --runs-dir, or a LoRA file (kohya's or diffusers' layout)"
_OUTPUT = "the kohya-layout file to write; its diffusers-layout copy goes beside it as NAME.diffusers.safetensors"


def add_reshape(commands: argparse._SubParsersAction) -> None:
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
    for command, run in ((resize, _resize), (merge, _merge)):
        command.add_argument("--output", required=True, help=_OUTPUT)
        command.add_argument("--runs-dir", default="", help="where runs are looked up by name (default ./runs)")
        command.set_defaults(run=run)


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


def add_push(commands: argparse._SubParsersAction) -> None:
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
    push.set_defaults(run=_push)


def _push(args: argparse.Namespace) -> int:
    from lora_gui.hub import push_to_hub

    url = push_to_hub(args.run_dir, args.repo, args.token or os.environ.get("HF_TOKEN"), args.private)
    print(f"Uploaded to {url}", file=sys.stderr)
    return 0
