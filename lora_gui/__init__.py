"""lora_gui: a LoRA trainer for Stable Diffusion that a beginner can use.

The engine (everything here but `ui`) never imports gradio; the app in `lora_gui.ui` is a thin
skin over it. docs/ARCHITECTURE.md maps the modules.
"""

__version__ = "0.1.0"
