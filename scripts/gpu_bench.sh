#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, in one call on a lent machine (see BENCHMARKS.md, "How to rerun").
# Its image has torch, accelerate, peft and transformers but no diffusers: carry wheels in .whl/, made here
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# transformers==5.24.0 huggingface_hub==2.4.0` (and what `pip show` there says is missing).
set -uo pipefail
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
work=/tmp/bench-work
run() {  # name, then bench flags
  local name=$1; shift
  echo "== $name: python -m lora_gui bench $*"
  timeout 240 python3 -m lora_gui bench --workdir "$work" --json "$out/$name.json" "$@" 2>"$out/$name.log" | tee "$out/$name.txt"
}
run sd15-b1 --model sd15 --batch-size 1 --steps 30 --warmup 5
run sd15-b8 --model sd15 --batch-size 8 --steps 20 --warmup 5
run sdxl-b1 --model sdxl --batch-size 1 --steps 10 --warmup 3
run sd15-low-vram --model sd15 --batch-size 1 --steps 10 --warmup 3 --preset sd15-low-vram
run sdxl-low-vram --model sdxl --batch-size 1 --steps 5 --warmup 2 --preset sdxl-low-vram
