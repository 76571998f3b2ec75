#!/usr/bin/env bash
# Fills .whl/ with what the lent GPU machine lacks for `scripts/gpu_bench.sh`, run here (where pip
# reaches a registry) before the one device call; the call then carries `.whl`.
#
# That machine's image (Python 3.12) already has torch, accelerate 1.15, huggingface_hub 1.33,
# tokenizers 0.23, safetensors, numpy, pillow, regex and requests, but no diffusers, an older
# transformers (5.17) and a peft of unknown version: carry the tested ones. All are pure-Python
# wheels, about 17 MB together. huggingface_hub stays the image's: 2.x needs httpx2, which it lacks,
# and 1.33 is enough for everything the benchmark does.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 importlib_metadata
ls -l .whl
