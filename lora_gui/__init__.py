"""lora_gui: a LoRA trainer for Stable Diffusion and Flux.1 that a beginner can use.

The engine (everything here but `ui`) never imports gradio; the app in `lora_gui.ui` is a thin
skin over it. docs/ARCHITECTURE.md maps the modules.
"""

import logging

__version__ = "0.1.0"

# diffusers imports the quantization libraries whenever they are installed, and they log at import
# (kernels missing for GPUs other than this one, deprecations in torch): nothing a user can act on.
for _library in ("torchao", "bitsandbytes", "torch.utils._pytree"):
    logging.getLogger(_library).setLevel(logging.ERROR)


def quiet_ml_libraries() -> None:
    """diffusers' and transformers' own verbosity and progress bars, turned down: their chatter would bury our messages.
    (Importing them takes seconds: the app does this as its engine loads, not before its page answers.)"""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
