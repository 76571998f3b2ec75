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
    _quiet_libraries()
    try:
        return args.run(args)
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
