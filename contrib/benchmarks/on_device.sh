#!/usr/bin/env bash
# The device checks as one prepared run, sized for a lent GPU's budget (about 8 minutes on an H100):
# every mode's clipped step against a float64 CPU loop, then the benchmark rows, one repetition each.
# Usage (from the repository root, dpkit importable, e.g. PYTHONPATH=.):  bash contrib/benchmarks/on_device.sh OUT_DIR
set -euo pipefail
out=${1:-contrib/benchmarks/results/device}
here=$(dirname "$0")
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" "$here/device_check.py" --device cuda | tee "$out/device_check.md"
# issue 24 item 5: non-private, Opacus hooks and ghost, dpkit auto, bk and ghost, alternating in one run per row;
# time and peak allocated memory. Rows in order of priority (a cut budget keeps the first): GPT-2 small at 16x256
# and 8x1024 in fp32 and bf16 autocast, the CIFAR-style convnet, Hugging Face GPT-2 small and BERT-base.
common=(--device cuda --repeat 1 --steps 6 --warmup 2 --modes ghost,bk,auto)
if "$py" -c "import opacus" 2>/dev/null; then common+=(--opacus); fi
"$py" "$here/flops.py" | tee "$out/flops.md"
row() {  # name, then bench.py arguments
  local name=$1; shift
  "$py" "$here/bench.py" "$@" "${common[@]}" --json "$out/$name.json" | tee "$out/$name.md"
}
row gpt2-16x256 --model gpt2-small --batch 16 --seq 256
row gpt2-16x256-bf16 --model gpt2-small --batch 16 --seq 256 --autocast bf16
row gpt2-8x1024-bf16 --model gpt2-small --batch 8 --seq 1024 --autocast bf16
row gpt2-8x1024 --model gpt2-small --batch 8 --seq 1024
row convnet-256 --model convnet --batch 256
# the Hugging Face rows need transformers and the dpkit-transformers plugin installed (its samplers for Conv1D)
if "$py" -c "import transformers, dpkit_transformers" 2>/dev/null; then
  row hf-gpt2-16x256 --model hf-gpt2 --batch 16 --seq 256
  row hf-bert-32x128 --model hf-bert --batch 32 --seq 128
fi
