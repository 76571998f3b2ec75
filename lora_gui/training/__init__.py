"""Training a LoRA: `train` runs one into a run folder (fresh or resumed) and reports through events.

`setup` makes everything the loop needs, `loop` is the loop itself, `validation` the held-out loss and the best
step, `checkpoints` what a run saves and resumes from, `previews` its sample pictures, `messages` how it ends in
words.
"""

from lora_gui.training.loop import train
from lora_gui.training.messages import Stopped

__all__ = ["Stopped", "train"]
