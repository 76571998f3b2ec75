"""lora_gui: a LoRA trainer for Stable Diffusion that a beginner can use.

The engine (config, data, families, train, lora_files, infer, jobs) never imports gradio; the app
in `lora_gui.ui` is a thin skin over it.
"""

__version__ = "0.1.0"
