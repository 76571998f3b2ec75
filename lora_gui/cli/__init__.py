"""Command line: `python -m lora_gui ui|caption|train|generate|export|resize|merge|push|tiny-model|presets|bench|
doctor`.

Each command's flags and its work sit together, in a module of its kind: `train`, `caption`, `loras` (generate,
export, resize, merge, push) and `tools` (ui, tiny-model, presets, bench, doctor); `console` has what several show
on the terminal alike (a download's bar, Ctrl+C).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lora_gui import quiet_ml_libraries
from lora_gui.cli import caption, loras, tools, train
from lora_gui.errors import LoraGuiError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_gui", description="Train and use LoRAs for Stable Diffusion and Flux."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # In the order --help lists them.
    for add in (
        tools.add_ui,
        caption.add_caption,
        train.add_train,
        loras.add_generate,
        loras.add_export,
        loras.add_reshape,
        loras.add_push,
        tools.add_tiny_model,
        tools.add_presets,
        tools.add_bench,
        tools.add_doctor,
    ):
        add(commands)
    args = parser.parse_args(argv)
    _quiet_libraries(args.command)
    try:
        return args.run(args)
    except LoraGuiError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1


def _quiet_libraries(command: str) -> None:
    """Library chatter (progress bars, deprecation notes) would bury our own messages."""
    import warnings

    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[console])
    warnings.filterwarnings("ignore", category=FutureWarning)
    # torchvision, where it is installed beside a torch it wasn't built for, warns as transformers imports it; we use
    # none of its compiled parts.
    warnings.filterwarnings("ignore", module="torchvision")
    for name in ("transformers", "diffusers", "accelerate", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if command != "ui":  # the app quiets them as its engine loads, after the page answers (ui/engine.py)
        quiet_ml_libraries()
