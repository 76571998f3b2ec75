"""What the tests share, one module per kind of thing (no test module imports another, and conftest.py keeps only
fixtures and hooks):

- `paths`: the checkout's root and test-artifacts/.
- `runs`: settings for a run of seconds (`quick_config`, `train_argv`).
- `pipes`: tiny pipelines loaded fresh, the picture a test compares, training that keeps that picture, the demo's pink.
- `app`: `python app.py` as a user starts it, and reading what its endpoints answer.
- `browser`: Debian's Chromium for Playwright, and screenshots.
- `hub`: a fake Hugging Face Hub for downloads and uploads, and a download cache laid out as huggingface_hub's.
- `lora_files`: LoRA files made as other tools make them.
- `flux_files`: Flux checkpoints in Black Forest Labs' own single-file layout.
- `two_ranks.py`: a script `accelerate launch` runs as each of two processes.
"""
