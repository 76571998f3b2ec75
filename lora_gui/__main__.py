"""`python -m lora_gui ...`, and `accelerate launch -m lora_gui train ...`: the command line of `lora_gui.cli`."""

import sys

from lora_gui.cli import main

if __name__ == "__main__":
    sys.exit(main())
