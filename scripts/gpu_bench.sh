#!/usr/bin/env bash
# The GPU checks and the GPU rows of BENCHMARKS.md, in one call on a lent machine (see BENCHMARKS.md,
# "How to rerun").
#
# Before the call, here: `bash scripts/gpu_wheels.sh` (fills .whl/ with what that machine lacks).
# The call: run `bash scripts/gpu_bench.sh` with carry [".whl"] and timeout_s 600. First the smoke
# checks (scripts/gpu_smoke.py: train, previews and Generate in bf16 and fp16 for each tiny model, then
# the card rows: the GPU capped to 12, 16 and 24 GB as a bf16 and an fp16-only card, Flux trained with
# that card's preset and Generate with quantize "auto"; at most 4 minutes: it starts no check its own
# budget of 230 s can't finish, and says SKIP), then the benchmark rows, most important first. It
# starts no new row when fewer than 4 minutes of its 9 are left, so it always returns what it
# measured, in five files (the device tool brings back at most eight): $OUT/gpu.txt (the machine and
# versions), smoke.txt (one PASS / FAIL / SKIP line per check, with each part's time after a #),
# results.txt (every row's table), results.json (every row's numbers) and logs.txt (stderr).
# BENCH_ROWS='flux-*' (a pattern of row names) runs only the rows it matches, without the smoke checks: the
# Flux rows come last, so a call that runs everything rarely reaches them.
set -uo pipefail
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
deadline=$((SECONDS + ${BENCH_SECONDS:-540}))
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, regex; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, regex.__version__)" | tee -a "$out/gpu.txt"
work=/tmp/bench-work
rows=/tmp/bench-rows
mkdir -p "$rows"
# The smoke checks write the real SD 1.5 architecture and the shallow Flux into $work (as far as their
# time allows), where the rows below find them.
if [ -z "${BENCH_ROWS:-}" ]; then
  timeout 240 python3 scripts/gpu_smoke.py --workdir "$work" 2>>"$out/logs.txt" | tee "$out/smoke.txt"
else
  echo "smoke checks skipped: BENCH_ROWS=$BENCH_ROWS" | tee "$out/smoke.txt"
fi
run() {  # name, then bench flags
  local name=$1; shift
  [[ $name == ${BENCH_ROWS:-*} ]] || return 0  # unquoted: a pattern
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 240 ]; then echo "== $name: skipped, ${left}s left" | tee -a "$out/results.txt"; return; fi
  echo "== $name: python -m lora_gui bench $*" | tee -a "$out/results.txt" >>"$out/logs.txt"
  timeout "$((left - 10))" python3 -m lora_gui bench --workdir "$work" --json "$rows/$name.json" "$@" \
    2>>"$out/logs.txt" | tee -a "$out/results.txt"
  python3 -c 'import json, pathlib, sys; print(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}, indent=1))' \
    "$rows" >"$out/results.json"
}
run sd15-b1 --model sd15 --batch-size 1 --steps 30 --warmup 5
run sd15-b8 --model sd15 --batch-size 8 --steps 20 --warmup 5
run sd15-low-vram --model sd15 --batch-size 1 --steps 10 --warmup 3 --preset sd15-low-vram
run sdxl-low-vram --model sdxl --batch-size 1 --steps 5 --warmup 2 --preset sdxl-low-vram
run sdxl-b1 --model sdxl --batch-size 1 --steps 10 --warmup 3
# Options for ours, to keep or drop by what they measure (compiling takes a minute or two first).
run sd15-b8-compile --model sd15 --batch-size 8 --steps 20 --warmup 5 --ours torch_compile=true
run sd15-b8-channels-last --model sd15 --batch-size 8 --steps 20 --warmup 5 --ours channels_last=true
# Flux.1 at full width with 1/19 of its depth (1 double and 2 single blocks, 1 T5 layer; 2.4 GB, written in
# about 30 s): the whole model's 34 GB of random weights take longer to write and load than a call lasts.
# Each block costs what the real model's do, so these give the per-block ratio (see BENCHMARKS.md).
run flux-shallow-512-b1 --model flux-shallow --resolution 512 --batch-size 1 --steps 20 --warmup 5
run flux-shallow-1024-b1 --model flux-shallow --resolution 1024 --batch-size 1 --steps 20 --warmup 5
run flux-shallow-1024-b4 --model flux-shallow --resolution 1024 --batch-size 4 --steps 10 --warmup 3
# Flux.2 klein 4B at full width with a fifth of its depth (1 of 5 double and 4 of 20 single blocks, 4 of Qwen3-4B's
# 36 layers), against diffusers' train_dreambooth_lora_flux2_klein.py; and the whole 4B, which an 80 GB card holds.
run flux2-klein-shallow-512-b1 --model flux2-klein-shallow --resolution 512 --batch-size 1 --steps 20 --warmup 5
run flux2-klein-shallow-1024-b1 --model flux2-klein-shallow --resolution 1024 --batch-size 1 --steps 20 --warmup 5
run flux2-klein-1024-b1 --model flux2-klein --resolution 1024 --batch-size 1 --steps 10 --warmup 3
# Chroma at full width with 1/19 of its depth (1 of 19 double and 2 of 38 single blocks, its approximator whole, 1 T5
# layer). diffusers has no Chroma training script: the reference is its Flux.1 script's loop, which takes the same step.
run chroma-shallow-512-b1 --model chroma-shallow --resolution 512 --batch-size 1 --steps 20 --warmup 5
run chroma-shallow-1024-b1 --model chroma-shallow --resolution 1024 --batch-size 1 --steps 20 --warmup 5
# Flux.2 dev at full width with 1 of its 8 double and 2 of its 48 single blocks (4 of Mistral-Small's 40 layers),
# against diffusers' train_dreambooth_lora_flux2.py; the whole 32B (64 GB in bf16) trains on no single card unswapped.
run flux2-dev-shallow-512-b1 --model flux2-dev-shallow --resolution 512 --batch-size 1 --steps 20 --warmup 5
run flux2-dev-shallow-1024-b1 --model flux2-dev-shallow --resolution 1024 --batch-size 1 --steps 20 --warmup 5
# Z-Image at full width with 2 of its 30 layers and one refiner of each kind (4 of its 34 blocks) and 4 of Qwen3-4B's
# 36 layers (3.3 GB); BENCH_ROWS='zimage-*' runs them alone.
run zimage-shallow-512-b1 --model zimage-shallow --resolution 512 --batch-size 1 --steps 20 --warmup 5
run zimage-shallow-1024-b1 --model zimage-shallow --resolution 1024 --batch-size 1 --steps 20 --warmup 5
# Qwen-Image at full width with 2 of its 60 blocks and 4 of Qwen2.5-VL-7B's 28 layers (5.4 GB, most of it Qwen's
# embeddings and head), against diffusers' train_dreambooth_lora_qwen_image.py; BENCH_ROWS='qwen-image-*' alone.
run qwen-image-shallow-512-b1 --model qwen-image-shallow --resolution 512 --batch-size 1 --steps 20 --warmup 5
run qwen-image-shallow-1024-b1 --model qwen-image-shallow --resolution 1024 --batch-size 1 --steps 20 --warmup 5
# Block swap (lora_gui/block_swap.py) on the shallow Z-Image at 1024 px: with gradient checkpointing alone, then with
# 2 of its 4 blocks streamed from pinned CPU memory; the two rows' ours give what it costs a step and saves in peak
# memory. BENCH_ROWS='swap*' runs them alone (the smoke checks' block-swap row measures the same at 512 px).
run swap0-zimage-shallow-1024-b1 --model zimage-shallow --resolution 1024 --batch-size 1 --steps 10 --warmup 3 \
  --ours gradient_checkpointing=true
run swap2-zimage-shallow-1024-b1 --model zimage-shallow --resolution 1024 --batch-size 1 --steps 10 --warmup 3 \
  --ours gradient_checkpointing=true --ours blocks_to_swap=2
