#!/usr/bin/env bash
# Issue 4's device checks as one prepared run, sized for a lent GPU's budget (about 6 minutes on an H200):
# every mode's clipped step against a float64 CPU loop, then the three benchmark shapes, one repetition each.
# Usage (from the repository root, dpkit importable, e.g. PYTHONPATH=.):  bash contrib/benchmarks/on_device.sh OUT_DIR
set -euo pipefail
out=${1:-contrib/benchmarks/results/device}
here=$(dirname "$0")
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" "$here/device_check.py" --device cuda | tee "$out/device_check.md"
common=(--device cuda --repeat 1 --steps 10 --warmup 3 --modes hooks,ghost,bk,auto)
if "$py" -c "import opacus" 2>/dev/null; then common+=(--opacus); fi
"$py" "$here/flops.py" | tee "$out/flops.md"
"$py" "$here/bench.py" --model gpt2-small --batch 16 --seq 256 "${common[@]}" --json "$out/gpt2-16x256.json" | tee "$out/gpt2-16x256.md"
"$py" "$here/bench.py" --model gpt2-small --batch 8 --seq 1024 "${common[@]}" --json "$out/gpt2-8x1024.json" | tee "$out/gpt2-8x1024.md"
"$py" "$here/bench.py" --model convnet --batch 256 "${common[@]}" --json "$out/convnet-256.json" | tee "$out/convnet-256.md"
