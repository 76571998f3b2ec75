#!/usr/bin/env bash
# Fills .whl/ with what the lent GPU machine lacks for `scripts/gpu_bench.sh`, run here (where pip
# reaches a registry) before the one device call; the call then carries `.whl`.
#
# That machine's image (Python 3.12, x86-64) already has torch, accelerate 1.15, huggingface_hub 1.33,
# tokenizers 0.23, safetensors 0.8, numpy, pillow, pyyaml, typer, tqdm and requests, which are all
# what the tested versions below ask for. It lacks diffusers, has an older transformers (5.17) and a
# peft of unknown version: carry the tested ones (pure Python). transformers 5.24 checks at import
# that regex is 2025.10.22 or newer, and the image's regex is of unknown age: carry a newer one (a
# compiled wheel, for CPython 3.12 on manylinux x86-64). huggingface_hub stays the image's: 2.x needs
# httpx2, which it lacks, and 1.33 satisfies diffusers (>=1.32) and transformers (>=1.31). Nothing
# imports importlib_metadata on Python 3.12 (diffusers takes importlib.metadata), so it stays behind.
# The quantized bases (quantize_base): torchao (3.4 MB, for int8) is carried; bitsandbytes (43 MB, for NF4) would
# take the carry over its 64 MiB with the rest, so the NF4 smoke checks use the image's own, and say so if it
# has none.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  diffusers==0.42.1 transformers==5.24.0 peft==0.21.2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl 'regex==2026.5.9'
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl 'torchao==0.18.0'
ls -l .whl
