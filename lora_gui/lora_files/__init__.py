"""LoRA files: every layout a run's LoRA is written in, and telling what a file from elsewhere is.

- `diffusers_layout`: the file the loop writes and resume reads (peft's names, LoraConfig in metadata).
- `kohya_layout`: the conversion to what AUTOMATIC1111, Forge and ComfyUI load, and kohya's hashes.
- `metadata`: what the kohya file says about how it was trained (kohya's `ss_*`, ModelSpec's).
- `export`: a run's LoRA written again from its run folder, in either layout.
- `detect`: a file made elsewhere: its layout, and whether it fits this base model.
- `reshape`: a LoRA (a run's or a file) resized to a lower rank, or several merged into one.
"""

# The layouts a run's LoRA can be written in: kohya's (<name>.safetensors) and diffusers'
# (pytorch_lora_weights.safetensors), or both.
LORA_LAYOUTS = ("kohya", "diffusers", "both")
# Weight files (a LoRA, a checkpoint) in PyTorch's pickle format, which can run code as it is read: refused unless
# the user allows them. Named here, apart from torch, for the app's upload boxes.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
