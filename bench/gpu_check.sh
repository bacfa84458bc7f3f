#!/usr/bin/env bash
# GPU checks (issues 5 and 8), for an H100-class node with the stack installed (`pip install -e '.[gpu]'`).
# Runs in under 8 minutes: pretraining throughput/MFU/data-wait, then (if present) the archive GPU check.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures GPUs')"
timeout 300 python bench/bench_gpu_train.py --n 16384 --epochs 3
if [ -f bench/bench_gpu_index.py ]; then timeout 180 python bench/bench_gpu_index.py; fi
