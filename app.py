"""`python app.py` starts the LoRA trainer in your browser (Hugging Face Spaces runs this file too)."""

import sys

from lora_gui.cli import main

if __name__ == "__main__":
    sys.exit(main(["ui", *sys.argv[1:]]))
